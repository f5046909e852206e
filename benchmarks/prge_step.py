"""Time and peak memory of one training step: batched P-RGE vs sequential ZO vs first-order backprop.

Every (method, q) runs in fresh child processes on the same model, batch and seeds: one for the timing, one
for the peak RSS of one step over the loaded model (with glibc returning big blocks to the OS on free, which
would slow the timing run down with page faults). Also measured in the same run: a plain
forward pass (inference, the memory floor) and the machine's fp32 matmul peak (a large GEMM), against which
each step's achieved FLOP/s is reported (FLOPs counted by ``torch.utils.flop_counter``).

    python benchmarks/prge_step.py                    # SmolLM2-135M, q in 1 2 4 8 16 (~25 min)
    python benchmarks/prge_step.py --model tiny

Methods:
  inference   one forward of the batch (bs rows) with one B: what an inference engine does anyway
  inference_2q  one forward of the same 2q*bs rows P-RGE evaluates, without directions or update: the
              memory an inference engine needs for that batch
  prge        fedprge's step: 2q replicas of B in ONE forward of 2q*bs rows
  prge_bf16   the same with precision='shared-bf16': frozen matmuls in bf16 as replica 0 + differences
  sequential  the same estimator as 2q separate forwards of bs rows (MeZO-style), our loss code
  naive       2q separate forwards through the plain Hugging Face model call (full-vocabulary logits and
              loss on every position), B set per call: what a straightforward implementation does
  backprop    first-order LoRA-FA: forward + backward + SGD on B (autograd keeps the activations)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from fedprge.procmem import reset_peak, status_kib

METHODS = ("inference", "inference_2q", "prge", "prge_bf16", "sequential", "naive", "backprop")
PER_Q = ("inference_2q", "prge", "prge_bf16", "sequential", "naive")  # methods whose work grows with q
ZO_STEPS = ("prge", "prge_bf16", "sequential", "naive")  # methods that return projected gradients


def child(args: argparse.Namespace) -> dict:
    """Measure one method at one q in this process; returns a result row."""
    import torch

    torch.set_num_threads(args.threads)
    from torch.utils.flop_counter import FlopCounterMode

    from fedprge.data import encode, load_federated
    from fedprge.engine import rng
    from fedprge.engine.adapters import LoRAConfig, LoRAFA
    from fedprge.engine.backend import EagerBackend
    from fedprge.engine.backprop import BackpropTrainer
    from fedprge.engine.estimator import ZOConfig, prge_step, sequential_step
    from fedprge.models import load_model

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    lora = LoRAFA(model, LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj")))
    backend = EagerBackend(model, lora, precision="shared-bf16" if args.method == "prge_bf16" else "float32")
    data = load_federated("shakespeare", 1, max_train_per_client=args.bs, chunk_words=args.seq)
    batch = encode(tok, data.clients[0].train[: args.bs], args.seq)
    b = 1e-3 * rng.directions([7], lora.num_params)[0]  # a nonzero B so every path really uses it
    zo = ZOConfig(q=args.q, eps=1e-2, lr=1e-3)
    seeds = [rng.derive_seed(1, i) for i in range(args.q)]

    def naive_loss(reps: torch.Tensor) -> torch.Tensor:
        with lora.use(reps):
            return model(**batch).loss.reshape(1)

    if args.method == "inference":
        run = lambda: backend.losses(b.unsqueeze(0), batch)  # noqa: E731
    elif args.method == "inference_2q":
        run = lambda: backend.losses(b.expand(2 * args.q, -1), batch)  # noqa: E731
    elif args.method in ("prge", "prge_bf16"):
        run = lambda: prge_step(lambda r: backend.losses(r, batch), b, seeds, zo)  # noqa: E731
    elif args.method == "sequential":
        run = lambda: sequential_step(lambda r: backend.losses(r, batch), b, seeds, zo)  # noqa: E731
    elif args.method == "naive":
        run = lambda: sequential_step(naive_loss, b, seeds, zo)  # noqa: E731
    else:
        trainer = BackpropTrainer(backend, b, lr=1e-3)
        run = lambda: trainer.step(batch)  # noqa: E731

    grad_ctx = torch.enable_grad() if args.method == "backprop" else torch.no_grad()
    with torch.no_grad():
        backend.losses(b.unsqueeze(0), batch)  # pages in every weight, so the baseline is the loaded model
    with grad_ctx:
        rss_loaded = status_kib("VmRSS")
        reset_peak()  # the peak from here on
        out = run()  # warm-up (its allocations count: the peak is the step's, from the loaded model upwards)
        peak = status_kib("VmHWM")
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t)
        with FlopCounterMode(display=False) as counter:
            if args.steps:
                run()
    grads = list(out[1].projected_grads) if args.method in ZO_STEPS else None
    half = None  # the estimator's own sensitivity to eps: the yardstick for "within tolerance"
    if args.method == "prge":
        with torch.no_grad():
            half_zo = ZOConfig(q=args.q, eps=zo.eps / 2, lr=zo.lr)
            half = list(prge_step(lambda r: backend.losses(r, batch), b, seeds, half_zo)[1].projected_grads)
    sec = min(times) if times else math.nan  # the least disturbed run: other processes only ever add time
    rows = 2 * args.q * args.bs if args.method in PER_Q else args.bs
    return {
        "model": args.model,
        "method": args.method,
        "q": args.q if args.method in PER_Q else 0,
        "bs": args.bs,
        "tokens": int(batch["input_ids"].numel()),
        "s_per_step": sec,
        "tokens_per_s": rows * batch["input_ids"].shape[1] / sec,
        "gflop_per_step": counter.get_total_flops() / 1e9,
        "gflop_per_s": counter.get_total_flops() / 1e9 / sec,
        "rss_model_mib": rss_loaded / 1024,
        "peak_rss_mib": peak / 1024,
        "step_extra_mib": (peak - rss_loaded) / 1024,
        "projected_grads": grads,
        "projected_grads_half_eps": half,
        "params_b": lora.num_params,
    }


def matmul_peak(threads: int, n: int = 2048, dtype: str = "float32") -> float:
    """GFLOP/s of the best of several n x n x n GEMMs: the ceiling an fp32 forward pass can reach here."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="tiny, smollm2 or a local HF folder")
    p.add_argument("--q", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=64, help="tokens per example (Shakespeare text, truncated)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell (the fastest is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the only stable timing on 2 cores)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default="benchmarks/results", help="folder for the CSV and JSON results")
    p.add_argument("--method", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.method:
        args.q = args.q[0]
        print(json.dumps(child(args)))
        return

    peak, peak16 = matmul_peak(args.threads), matmul_peak(args.threads, dtype="bfloat16")
    cells = [(m, q) for m in args.methods for q in (args.q if m in PER_Q else [args.q[0]])]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    # Memory runs apart: big blocks mmapped and unmapped on free, so RSS tracks live tensors instead of glibc's
    # cached heap; that costs page faults on every allocation, which would distort the timings.
    mem_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        track = lambda it, **_: it  # noqa: E731
    for method, q in track(cells, description="benchmark cells"):
        cmd = [sys.executable, __file__, "--method", method, "--q", str(q), "--model", args.model]
        cmd += ["--bs", str(args.bs), "--seq", str(args.seq), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads), "--dtype", args.dtype]
        row = _run_child(cmd, env)
        mem = _run_child([*cmd, "--steps", "0"], mem_env)
        row |= {k: mem[k] for k in ("rss_model_mib", "peak_rss_mib", "step_extra_mib")}
        row["peak_fraction"] = row["gflop_per_s"] / peak
        rows.append(row)
    report(rows, peak, peak16, args)


def _run_child(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:6])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: list[dict], peak: float, peak16: float, args: argparse.Namespace) -> None:
    by = {(r["method"], r["q"]): r for r in rows}
    inf, bp = by.get(("inference", 0)), by.get(("backprop", 0))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"one training step on {args.model}, bs={args.bs}, {args.threads} thread(s), {args.dtype}")
    cols = ("q", "method", "s/step", "x faster than sequential", "tokens/s", "GFLOP/s", "% fp32 peak")
    for c in (*cols, "peak RSS MiB", "+step MiB"):
        t.add_column(c, justify="right", no_wrap=True)
    for q in args.q:
        base = by.get(("sequential", q))
        for m in ("prge", "prge_bf16", "sequential", "naive", "inference_2q"):
            r = by.get((m, q))
            if r:
                t.add_row(*_cells(r, base, str(q)))
        for r in (x for x in (inf, bp) if x is not None and q == args.q[-1]):
            t.add_row(*_cells(r, None, "-"))
    Console(width=160).print(t)
    print(f"matmul peak (2048^3 GEMM, {args.threads} thread): fp32 {peak:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s")
    for q in args.q:
        s = by.get(("sequential", q))
        for m in ("prge", "prge_bf16", "naive"):
            if s and (r := by.get((m, q))):
                r["speedup_vs_sequential"] = s["s_per_step"] / r["s_per_step"]
                r["g_rel_err_vs_sequential"] = g_rel_err(r["projected_grads"], s["projected_grads"])
                print(
                    f"q={q}: {m} is {r['speedup_vs_sequential']:.2f}x faster than sequential, projected gradients "
                    f"{100 * r['g_rel_err_vs_sequential']:.2f}% off (relative L2)"
                )
        if s and (r := by.get(("prge", q))):
            r["g_rel_change_half_eps"] = g_rel_err(r["projected_grads_half_eps"], s["projected_grads"])
            print(f"q={q}: for scale, fp32 P-RGE with eps/2 moves them {100 * r['g_rel_change_half_eps']:.2f}%")
    if inf and bp:
        for q in args.q:
            if pr := by.get(("prge", q)):
                i2 = by.get(("inference_2q", q))
                print(
                    f"q={q}: memory over the loaded model: prge {pr['step_extra_mib']:.0f} MiB, inference of the "
                    f"same {2 * q * args.bs} rows {i2['step_extra_mib'] if i2 else float('nan'):.0f} MiB, inference "
                    f"of the {args.bs} rows {inf['step_extra_mib']:.0f} MiB, backprop {bp['step_extra_mib']:.0f} MiB"
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"prge_step-{Path(args.model).name}"
    meta = {"matmul_peak_gflops": peak, "bf16_matmul_peak_gflops": peak16, "threads": args.threads}
    meta |= {"bs": args.bs, "seq": args.seq, "dtype": args.dtype}
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(f"{stem}.csv", "w", newline="") as f:
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if not k.startswith("projected_grads")]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"results: {stem}.json, {stem}.csv")


def g_rel_err(g: list[float], ref: list[float]) -> float:
    """||g - ref|| / ||ref|| of two projected-gradient vectors."""
    num = sum((a - b) ** 2 for a, b in zip(g, ref, strict=True)) ** 0.5
    return num / max(sum(b * b for b in ref) ** 0.5, 1e-30)


def _cells(r: dict, base: dict | None, q: str) -> list[str]:
    ratio = f"{base['s_per_step'] / r['s_per_step']:.2f}" if base else "-"
    return [
        q,
        r["method"],
        f"{r['s_per_step']:.3f}",
        ratio,
        f"{r['tokens_per_s']:.0f}",
        f"{r['gflop_per_s']:.1f}",
        f"{100 * r['peak_fraction']:.0f}%",
        f"{r['peak_rss_mib']:.0f}",
        f"{r['step_extra_mib']:.0f}",
    ]


if __name__ == "__main__":
    main()
