"""Cross-client batching: client-steps per second when K clients share one P-RGE forward, against K one by one.

    python benchmarks/cross_client.py                              # SmolLM2 on this CPU, K in 1 2 4 8 (~5 min)
    python benchmarks/cross_client.py --device cuda --ks 1 4 16 64  # a GPU machine
    python benchmarks/cross_client.py --model tiny --repeats 2      # seconds

Each client has its own state B, its own Shakespeare batch (``--batch-size`` rows, the main job's 1) and its own
seeds, as in a simulation round. Both ways run in this one process, interleaved repeat by repeat (so machine load
hits both alike); the table shows the medians, their ratio, and how far the batched projected gradients are from
the one-by-one ones (float rounding of a wider batch, relative). Writes ``benchmarks/results/cross_client-*.json``
and ``.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fedprge.data import encode, load_federated
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.backend import EagerBackend, backend_step, backend_steps
from fedprge.engine.estimator import ZOConfig
from fedprge.engine.shared_base import resolve_precision
from fedprge.models import load_model
from fedprge.results import write_rows


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> list[dict]:
    model, tok = load_model(args.model)
    precision = resolve_precision(args.precision)
    be = EagerBackend(model, LoRAFA(model, LoRAConfig()), precision=precision, device=args.device)
    zo = ZOConfig(q=args.q, eps=1e-2, lr=3e-2)
    data = load_federated("shakespeare", max(args.ks), "natural", seed=0)
    states = [1e-3 * rng.directions([k], be.num_params)[0] for k in range(max(args.ks))]
    batches = [encode(tok, c.train[: args.batch_size], 48) for c in data.clients]
    seeds = [[rng.derive_seed(1, k, i) for i in range(args.q)] for k in range(max(args.ks))]
    times: dict[tuple[int, str], list[float]] = {}
    error: dict[int, float] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up (allocator, kernels) and is not counted
        for k in args.ks:
            t0 = time.perf_counter()
            together = backend_steps(be, states[:k], batches[:k], seeds[:k], zo)
            sync(args.device)
            t1 = time.perf_counter()
            alone = [backend_step(be, states[i], batches[i], seeds[i], zo) for i in range(k)]
            sync(args.device)
            t2 = time.perf_counter()
            if rep:
                times.setdefault((k, "batched"), []).append(t1 - t0)
                times.setdefault((k, "one_by_one"), []).append(t2 - t1)
            g = torch.tensor([r.projected_grads for _, r, _ in together])
            g_alone = torch.tensor([r.projected_grads for _, r, _ in alone])
            error[k] = float((g - g_alone).norm() / g_alone.norm())
    rows = []
    for k in args.ks:
        batched, single = (statistics.median(times[k, way]) for way in ("batched", "one_by_one"))
        rows.append(
            {
                "model": args.model,
                "device": args.device,
                "precision": precision,
                "q": args.q,
                "batch_size": args.batch_size,
                "clients_per_forward": k,
                "batched_client_steps_per_s": k / batched,
                "one_by_one_client_steps_per_s": k / single,
                "speedup": single / batched,
                "projected_grad_rel_diff": error[k],
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "shared-bf16"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="clients per forward")
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    print(
        f"{args.model} on {args.device} ({rows[0]['precision']}, q={args.q}, batch {args.batch_size}, "
        f"{rows[0]['threads']} threads; medians of {args.repeats} interleaved repeats)"
    )
    print("| clients per forward | batched client-steps/s | one by one | speedup | g rel. diff |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients_per_forward']} | {r['batched_client_steps_per_s']:.2f} | "
            f"{r['one_by_one_client_steps_per_s']:.2f} | {r['speedup']:.2f}x | {r['projected_grad_rel_diff']:.1e} |"
        )
    stem = Path(args.out) / f"cross_client-{Path(args.model).name}-{args.device}"
    write_rows(stem, rows)
    print(f"-> {stem}.json / .csv")


if __name__ == "__main__":
    main()
