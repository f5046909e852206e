"""Time of one P-RGE step: eager PyTorch vs the exported .pte on ExecuTorch (XNNPACK delegate, portable kernels).

Same model, adapters, batch (Shakespeare text, exactly --seq tokens per row) and seeds in all three. Each variant
runs in a fresh child process: load, one warm-up step, --steps timed steps (the fastest is reported: other
processes on a shared machine only ever add time), peak RSS. A step is everything a client does per step:

  eager        EagerBackend.perturbed_losses: z from the seeds, 2q replicas of B, one batched forward; host z, g, update
  pte-xnnpack  PTEBackend.perturbed_losses: program.forward(ids, mask, labels, seeds, b) -> 2q losses (z drawn
               in-program); host z, g, update
  pte-portable the same program lowered without a delegate (ExecuTorch's portable reference kernels)

    python benchmarks/pte_step.py                         # tiny, q=4, bs=1, 48 tokens, 1 thread
    python benchmarks/pte_step.py --model smollm2 --steps 5

Results: a table, and benchmarks/results/pte_step-<model>.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedprge.procmem import status_mib as _rss_mib

VARIANTS = ("eager", "pte-xnnpack", "pte-portable")


def batch_for(tokenizer, bs: int, seq: int) -> dict:
    """``bs`` Shakespeare rows of exactly ``seq`` tokens (right-padded if a row is shorter)."""
    import torch

    from fedprge.data import encode, load_federated
    from fedprge.data.encode import IGNORE_INDEX

    data = load_federated("shakespeare", 1, max_train_per_client=bs, chunk_words=seq)
    batch = encode(tokenizer, data.clients[0].train[:bs], seq)
    width = batch["input_ids"].shape[1]
    if width < seq:
        pad = seq - width
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=tokenizer.pad_token_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
        batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=IGNORE_INDEX)
    return batch


def child(args: argparse.Namespace) -> dict:
    """Measure one variant in this process."""
    import torch

    torch.set_num_threads(args.threads)
    from fedprge.engine import rng
    from fedprge.engine.backend import backend_step
    from fedprge.engine.estimator import ZOConfig
    from fedprge.models import load_tokenizer

    t0 = time.perf_counter()
    if args.variant == "eager":
        from fedprge.engine.adapters import LoRAConfig, LoRAFA
        from fedprge.engine.backend import EagerBackend
        from fedprge.models import load_model

        model, tok = load_model(args.model, seed=0)
        backend = EagerBackend(model, LoRAFA(model, LoRAConfig()))
    else:
        from fedprge.export.backend import PTEBackend
        from fedprge.export.runtime import PTEProgram

        backend, tok = PTEBackend(PTEProgram(args.pte, num_threads=args.threads)), load_tokenizer(args.model)
    num_params = backend.num_params
    load_s = time.perf_counter() - t0
    batch = batch_for(tok, args.bs, args.seq)
    zo = ZOConfig(q=args.q, eps=1e-2, lr=1e-3)
    seeds = [rng.derive_seed(1, i) for i in range(args.q)]
    b = 1e-3 * rng.directions([7], num_params)[0]  # a nonzero B so every path really uses it

    def step():  # what Task.step does, on either backend
        return backend_step(backend, b, batch, seeds, zo)

    _, rec, _ = step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "variant": args.variant,
        "model": args.model,
        "q": args.q,
        "bs": args.bs,
        "seq": args.seq,
        "threads": args.threads,
        "params_b": num_params,
        "load_s": load_s,
        "ms_per_step": 1e3 * min(times),
        "ms_median": 1e3 * statistics.median(times),
        "peak_rss_mib": _rss_mib("VmHWM"),
        "projected_grads": list(rec.projected_grads),
    }


def export(args: argparse.Namespace, backend: str, folder: Path) -> tuple[Path, float | None]:
    """The variant's .pte in ``folder`` and the seconds its export took (None: reused from an earlier run)."""
    out = folder / f"{Path(args.model).name}-q{args.q}-bs{args.bs}-T{args.seq}-{backend}.pte"
    if out.exists() and out.with_suffix(".json").exists():
        return out, None
    cmd = [sys.executable, "-m", "fedprge.export", "--model", args.model, "--q", str(args.q), "--bs", str(args.bs)]
    cmd += ["--max-len", str(args.seq), "--backend", backend, "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2 or a local HF folder")
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--seq", type=int, default=48, help="tokens per row (the program's static length)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (the fastest is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch / ExecuTorch threads")
    p.add_argument("--pte-dir", help="where the .pte files are exported (reused when present; default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the CSV and JSON results")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--pte", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    folder = Path(args.pte_dir or tempfile.mkdtemp(prefix="pte_step-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--q", str(args.q)]
        cmd += ["--bs", str(args.bs), "--seq", str(args.seq), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads)]
        export_s: float | None = 0.0
        if variant != "eager":
            pte, export_s = export(args, variant.removeprefix("pte-"), folder)
            cmd += ["--pte", str(pte)]
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["export_s"] = export_s
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["x_vs_eager"] = r["ms_per_step"] / base["ms_per_step"]
        r["max_abs_dg"] = max(abs(a - b) for a, b in zip(r["projected_grads"], base["projected_grads"], strict=True))
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = rows[0]
    title = (
        f"one P-RGE step on {args.model} (P={r0['params_b']:,}), q={args.q}, bs={args.bs}, T={args.seq}, "
        f"{args.threads} thread(s)"
    )
    t = Table(title=title)
    for c in ("variant", "ms/step", "median ms", "x vs eager", "load s", "export s", "peak RSS MiB", "max |Δg|"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["variant"],
            f"{r['ms_per_step']:.1f}",
            f"{r['ms_median']:.1f}",
            f"{r['x_vs_eager']:.2f}",
            f"{r['load_s']:.2f}",
            "-" if r["variant"] == "eager" else "reused" if r["export_s"] is None else f"{r['export_s']:.1f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['max_abs_dg']:.1e}",
        )
    Console(width=max(120, Console().width)).print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"pte_step-{Path(args.model).name}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = [k for k in rows[0] if k != "projected_grads"]
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.csv and {stem}.json")


if __name__ == "__main__":
    main()
