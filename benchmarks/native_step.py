"""Time of one P-RGE step on the same .pte: the Python ExecuTorch client against the native client (C++).

Same program, batch (partition --partition's round-1 step-0 minibatch of the config) and seeds in both, 1 thread.
Each variant runs in its own process: load, one warm-up step, --steps timed steps (fastest and median reported:
other processes on a shared machine only ever add time), peak RSS. A step is what a client does per local step:
the program's forward (2q losses, z drawn in-program), g, the float32 update.

  python     Task.step on a client.backend=executorch Task (PTEBackend, estimator.finish_step)
  native     fedprge-client bench-step (Program/Method, recipe.cpp), built by clients/native/build.sh

    python benchmarks/native_step.py --pte tiny.pte                  # configs/smoke.yaml, partition 1
    python benchmarks/native_step.py --pte tiny.pte --steps 50
    python benchmarks/native_step.py --pte tiny.pte --bin wheel=clients/native/build/fedprge-client \
        --bin source=clients/native/build/source/client/fedprge-client     # build (a) and build (b) side by side

Results: a table, and benchmarks/results/native_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "clients" / "native" / "build" / "fedprge-client"


def python_child(args: argparse.Namespace) -> dict:
    """Measure the Python ExecuTorch client in this process."""
    import torch

    from fedprge.config import load_config
    from fedprge.engine.seeds import step_seeds
    from fedprge.procmem import status_mib
    from fedprge.task import Task

    cfg = load_config([args.config], ["client.backend=executorch", f"client.pte={args.pte}"])
    task = Task(cfg)
    batch, seeds = task.train_batch(args.partition, 1, 0), step_seeds(task.spec, 1, args.partition, 0)
    b0 = torch.zeros(task.num_params)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        task.step(b0, seeds, batch)
        if i:  # the first step is the warm-up (method load, XNNPACK weight packing)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"min_ms": min(times), "median_ms": statistics.median(times), "peak_rss_mib": status_mib("VmHWM")}


def native_run(args: argparse.Namespace, binary: str, work: Path) -> dict:
    """Measure one native client binary (a child process of its own)."""
    from fedprge.config import load_config, to_yaml

    sys.path.insert(0, str(REPO))
    from clients.native.client_data import write

    cfg = load_config([args.config], ["client.backend=executorch", f"client.pte={args.pte}"])
    (work / "run.yaml").write_text(to_yaml(cfg))
    data = write(cfg, args.partition, work / "data.json")
    cmd = [binary, "bench-step", "--pte", args.pte, "--data", str(data), "--config", str(work / "run.yaml")]
    res = subprocess.run([*cmd, "--steps", str(args.steps)], capture_output=True, text=True, check=True)
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "binary_mib": Path(binary).stat().st_size / 2**20}


def binaries(specs: list[str] | None) -> dict[str, str]:
    """``--bin`` values (``PATH`` or ``NAME=PATH``) as {row name: path}; exits naming a missing binary."""
    out = {}
    for spec in specs or [str(DEFAULT_BIN)]:
        name, _, path = spec.rpartition("=")
        if not Path(path).is_file():
            raise SystemExit(f"--bin {spec}: no such file (build it: clients/native/build.sh or build_source.sh)")
        out[f"native-{name}" if name else "native"] = path
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pte", required=True, help="a .pte matching --config (python -m fedprge.export ...)")
    p.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    p.add_argument("--partition", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bin", action="append", help=f"[NAME=]PATH of a fedprge-client, repeatable; default {DEFAULT_BIN}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pte = str(Path(args.pte).resolve())
    if args.child:
        print(json.dumps(python_child(args)))
        return 0
    natives = binaries(args.bin)
    cmd = [sys.executable, __file__, "--child", "--pte", args.pte, "--config", args.config]
    cmd += ["--partition", str(args.partition), "--steps", str(args.steps)]
    py = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    rows = {"python": py}
    for name, binary in natives.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = native_run(args, binary, Path(tmp))
    print(f"{'client':14} {'min ms':>8} {'median ms':>10} {'x python':>9} {'peak RSS MiB':>13} {'binary MiB':>11}")
    for name, r in rows.items():
        ratio, size = r["min_ms"] / py["min_ms"], f"{r['binary_mib']:11.1f}" if "binary_mib" in r else f"{'-':>11}"
        print(f"{name:14} {r['min_ms']:8.1f} {r['median_ms']:10.1f} {ratio:9.2f} {r['peak_rss_mib']:13.0f} {size}")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"pte": Path(args.pte).name, "config": Path(args.config).name, "steps": args.steps}
    (out / "native_step.json").write_text(json.dumps({**meta, **rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
