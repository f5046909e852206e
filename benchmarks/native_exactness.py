"""How far each fedprge-client build's numbers are from the Python ExecuTorch client's, in float32 ulps.

One round (partition 1, round 2, from zero B) on the same .pte, config and data: ``fedprge-client check-train``
per binary against the Python runtime (``Task`` with ``client.backend=executorch``). Compared: every step's 2q
losses (in ulps: the distance between the two float32 bit patterns), the projected gradients and the final B (ulps,
and the absolute difference: near zero ulps are tiny) and every evaluation metric (relative difference). Build
(a), against the wheel's runtime, runs the wheel's kernels and must be bit for bit (``tests/test_native_client.py``
asserts it); build (b), from ExecuTorch's sources, runs the portable kernels where the wheel runs the optimized
ones, so its losses may differ by a few ulps, and g = (L+ - L-) / 2 eps carries that difference divided by 2 eps.

    python benchmarks/native_exactness.py --pte tiny.pte \\
        --bin wheel=clients/native/build/fedprge-client --bin source=clients/native/build/source/client/fedprge-client

Results: a table, and benchmarks/results/native_exactness.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_step import REPO, binaries  # noqa: E402 - the sibling benchmark

PARTITION, ROUND = 1, 2


def ulps(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> np.ndarray:
    """Distance in float32 ulps between two arrays of float32 bit patterns (uint32)."""

    def ordered(bits: np.ndarray) -> np.ndarray:  # sign-magnitude -> one integer line, -0 and +0 both at 0
        i = np.asarray(bits, dtype=np.uint32).astype(np.int64)
        return np.where(i >= 2**31, 2**31 - i, i)

    return np.abs(ordered(np.asarray(a)) - ordered(np.asarray(b)))


def python_reference(cfg) -> dict:
    """The Python ExecuTorch client's numbers for the round: losses per step, grads, B (bits) and metrics."""
    import torch

    from fedprge.engine.seeds import step_seeds
    from fedprge.personalize import personalize
    from fedprge.task import Task

    task = Task(cfg)
    bits = lambda t: np.asarray(t, dtype=np.float32).reshape(-1).view(np.uint32)  # noqa: E731
    b0 = torch.zeros(task.num_params)
    want = task.train(b0, PARTITION, ROUND)
    b, losses = b0, []
    for step in range(cfg.federation.local_steps):
        seeds, batch = step_seeds(task.spec, ROUND, PARTITION, step), task.train_batch(PARTITION, ROUND, step)
        losses.append(bits(task.backend.perturbed_losses(b, batch, seeds, task.zo)))
        b = task.step(b, seeds, batch)[0]
    metrics = {}
    for method, p in personalize(task, list(cfg.eval.personalization), b0, PARTITION, want.b, None).items():
        metrics.update({f"{method}_{k}": v for k, v in task.evaluate(p.b, PARTITION).items()})
    return {"losses": np.stack(losses), "grads": bits(want.projected_grads), "b": bits(want.b), "metrics": metrics}


def compare(binary: str, pte: str, cfg, ref: dict) -> dict:
    """One binary's check-train output against the reference: max ulps per quantity, max relative metric error."""
    from clients.native.client_data import write
    from fedprge.config import to_yaml

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "run.yaml").write_text(to_yaml(cfg))
        data = write(cfg, PARTITION, work / "data.json")
        cmd = [binary, "check-train", "--pte", pte, "--data", str(data), "--config", str(work / "run.yaml")]
        res = subprocess.run([*cmd, "--round", str(ROUND)], capture_output=True, text=True, check=True, timeout=900)
    got = json.loads(res.stdout)
    out = {key: ulps(got[key], ref[key]) for key in ("losses", "grads", "b")}
    floats = lambda bits: np.asarray(bits, dtype=np.uint32).view(np.float32).astype(np.float64)  # noqa: E731
    diff = {key: np.abs(floats(got[key]) - floats(ref[key])) for key in ("grads", "b")}
    rel = [
        abs(got["metrics"][k] - v) / max(abs(v), 1e-30)
        for k, v in ref["metrics"].items()
        if isinstance(v, float) and k in got["metrics"]
    ]
    return {
        **{f"{k}_max_ulps": int(v.max()) for k, v in out.items()},
        **{f"{k}_equal": f"{int((v == 0).sum())} of {v.size}" for k, v in out.items()},
        **{f"{k}_max_abs": float(v.max()) for k, v in diff.items()},  # ulps mean little near zero (B, g)
        "metrics_max_rel": float(max(rel, default=0.0)),
        "metrics_compared": len(rel),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pte", required=True, help="a .pte matching --config (python -m fedprge.export ...)")
    p.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    p.add_argument("--bin", action="append", help="[NAME=]PATH of a fedprge-client, repeatable")
    args = p.parse_args(argv)
    natives = binaries(args.bin)
    sys.path.insert(0, str(REPO))
    from fedprge.config import load_config

    pte = str(Path(args.pte).resolve())
    cfg = load_config([args.config], ["client.backend=executorch", f"client.pte={pte}"])
    ref = python_reference(cfg)
    rows = {name: compare(binary, pte, cfg, ref) for name, binary in natives.items()}
    cols = ["losses_max_ulps", "losses_equal", "grads_max_abs", "b_max_abs", "b_equal", "metrics_max_rel"]
    print(f"{'client':14} " + " ".join(f"{c:>16}" for c in cols))
    for name, r in rows.items():
        print(f"{name:14} " + " ".join(f"{r[c]:>16.3g}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in cols))
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"pte": Path(pte).name, "config": Path(args.config).name, "partition": PARTITION, "round": ROUND}
    (out / "native_exactness.json").write_text(json.dumps({**meta, **rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
