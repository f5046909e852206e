"""Wall time of the simulator as the fleet grows: per round and per client-step, compute vs framework overhead.

Each fleet size runs a real Flower simulation on Ray (tiny model, tweets split IID, the same number of clients
per round), and the same clients' local training is also timed in this process without Flower: the compute a
round needs. What the round took beyond compute / workers is framework overhead (Flower messages, Ray
scheduling, serialization, the server's aggregation).

    python simulations/scaling.py                     # 50, 200 and 1000 clients
    python simulations/scaling.py --clients 50 2000

Prints the table and writes ``scaling.csv`` / ``.json`` and each fleet's run folder (``clients-N``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import SMOKE  # noqa: E402 - the sibling study script: configs/smoke.yaml from any directory


def compute_per_client_round(cfg, parts: list[int]) -> float:
    """Seconds of one client's local P-RGE training, timed in this process (no Flower, no Ray)."""
    import torch

    from fedprge.task import Task

    torch.set_num_threads(cfg.sim.cpus_per_client)
    task = Task(cfg)
    b = torch.zeros(task.num_params)
    task.train(b, parts[0], 1)  # warm-up
    times = []
    for p in parts:
        t = time.perf_counter()
        task.train(b, p, 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="results/scaling")
    args = p.parse_args()

    from fedprge.config import load_config
    from fedprge.procmem import PeakMemory
    from fedprge.results import RunWriter
    from fedprge.simulate import simulate

    rows = []
    for n in args.clients:
        over = [
            f"federation.clients={n}",
            f"federation.fraction={args.per_round / n}",
            f"federation.rounds={args.rounds}",
            "data.task=tweets",
            "data.partition=iid",
            "eval.every=0",
            "eval.personalization=[global]",
            "eval.max_clients=20",
            f"name=scale-{n}",
        ]
        cfg = load_config([SMOKE], over)
        compute = compute_per_client_round(cfg, list(range(5)))
        writer = RunWriter(cfg, out=Path(args.out) / f"clients-{n}", progress=False)
        t = time.perf_counter()
        with PeakMemory() as mem:
            summary = simulate(cfg, writer)
        total = time.perf_counter() - t
        rounds = [float(r["seconds"]) for r in writer.rounds]
        per_round = statistics.median(rounds)
        k, steps = int(writer.rounds[0]["sampled"]), cfg.federation.local_steps
        ideal = compute * k / cfg.sim.cpus
        rows.append(
            {
                "clients": n,
                "clients_per_round": k,
                "total_s": total,
                "outside_rounds_s": total - sum(rounds),
                "round_s": per_round,
                "compute_per_round_s": ideal,
                "overhead_per_round_s": per_round - ideal,
                "wall_per_client_step_s": per_round / (k * steps),
                "compute_per_client_step_s": compute / steps,
                "uplink_bytes_per_client_round": summary["uplink_bytes_per_client_round"],
                "peak_rss_all_mib": mem.total_peak / 2**20,
                "peak_rss_worker_mib": mem.worker_peak / 2**20,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"simulation cost by fleet size (tiny model, {args.per_round} clients per round)")
    cols = ["clients", "start+register+eval s", "round s", "compute/round s", "overhead/round s"]
    cols += ["wall per client-step ms", "x vs smallest fleet", "peak RSS MiB: all / one worker"]
    for c in cols:
        t.add_column(c, justify="right")
    base = rows[0]["wall_per_client_step_s"]
    for r in rows:
        t.add_row(
            str(r["clients"]),
            f"{r['outside_rounds_s']:.1f}",
            f"{r['round_s']:.2f}",
            f"{r['compute_per_round_s']:.2f}",
            f"{r['overhead_per_round_s']:.2f}",
            f"{1000 * r['wall_per_client_step_s']:.0f}",
            f"{r['wall_per_client_step_s'] / base:.2f}",
            f"{r['peak_rss_all_mib']:.0f} / {r['peak_rss_worker_mib']:.0f}",
        )
    Console(width=160).print(t)
    from fedprge.results import write_rows

    out = Path(args.out)
    write_rows(out / "scaling", rows)
    print(f"results: {out / 'scaling.json'}, {out / 'scaling.csv'}")


if __name__ == "__main__":
    main()
