"""The main job: one ``python -m fedprge.simulate`` run into a results folder, and the README's table of it.

    python simulations/main_job.py                                # the defaults: SmolLM2, 50 Shakespeare roles
    python simulations/main_job.py --config configs/smoke.yaml    # the tiny model, about a minute
    python simulations/main_job.py --versus                       # today's defaults against the previous ones

Every argument but ``--out`` and ``--versus`` goes to ``python -m fedprge.simulate`` unchanged. Besides the run
folder (``--out``/run: rounds.csv, clients.csv, summary.json, metric.png) it writes ``main_job.md``: per method the
mean, median and worst 10% of the held-out metric, on how many clients it beat ``global`` and kept the held-out
loss at or below the untuned model's, and the local step counts the validation chose.

``--versus`` runs the job twice side by side instead, each in its own process and one after the other: with the
previous defaults (:data:`PREVIOUS`, the overrides that restore them) and with today's. It writes
``versus.md`` / ``.json``: per run the process's wall seconds, its training rounds' seconds, the training
replica-forwards, the uplink per client-round and every method's mean held-out metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

# the main job's defaults before the equal-compute study chose today's (README, "The main job")
PREVIOUS = ["zo.q=4", "federation.local_steps=10"]


def markdown(summary: dict, clients: list[dict[str, float]]) -> str:
    name, higher = summary["metric"], summary["higher_is_better"]
    lines = [
        f"per-client held-out {name} ({'higher' if higher else 'lower'} is better), {len(clients)} clients evaluated",
        "",
        "| method | mean | median | worst 10% | better than global | loss ≤ untuned | local steps chosen: clients |",
        "|---|---|---|---|---|---|---|",
    ]
    g = f"global_{name}"
    for method, st in summary["methods"].items():
        m = f"{method}_{name}"
        mine = [r for r in clients if math.isfinite(r.get(m, math.nan))]
        cells = [method, *(f"{st[k]:.4f}" for k in ("mean", "median", "worst10")), "", "", ""]
        if method not in ("untuned", "global"):  # strictly better than the global B on the same client
            both = [r for r in mine if math.isfinite(r.get(g, math.nan))]
            cells[4] = f"{sum(r[m] != r[g] and (r[m] > r[g]) == higher for r in both)}/{len(both)}"
        if method != "untuned":
            kept = sum(r.get(f"{method}_loss", math.nan) <= r.get("untuned_loss", math.nan) for r in mine)
            cells[5] = f"{kept}/{len(mine)}"
        steps = Counter(int(r[f"{method}_steps"]) for r in mine if math.isfinite(r.get(f"{method}_steps", math.nan)))
        cells[6] = ", ".join(f"{k}: {v}" for k, v in sorted(steps.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(v: str) -> float:
    return float(v) if v else math.nan


def clients_of(run: Path) -> list[dict[str, float]]:
    """A run folder's ``clients.csv`` as numbers (an empty cell: NaN)."""
    with open(run / "clients.csv") as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def timed_run(folder: Path, args: list[str]) -> dict:
    """``python -m fedprge.simulate *args`` into ``folder`` in its own process: its wall seconds and results."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedprge.simulate", *args, "--out", str(folder), "--no-progress"], check=True)
    wall = time.monotonic() - t0
    run = sorted(folder.glob("*/summary.json"))[-1].parent
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    from fedprge.config import load_config

    cfg = load_config([run / "config.yaml"])
    forwards = sum(2 * cfg.zo.q * cfg.federation.local_steps * int(r["ok"]) for r in rounds)
    return {
        "run": str(run),
        "wall_s": wall,
        "train_s": sum(float(r["seconds"]) for r in rounds),
        "q": cfg.zo.q,
        "local_steps": cfg.federation.local_steps,
        "lr": cfg.zo.lr,
        "train_replica_forwards": forwards,
        "uplink_B_per_client_round": summary["uplink_bytes_per_client_round"],
        "clients_evaluated": summary["clients_evaluated"],
        "metric": summary["metric"],
        "means": {m: st["mean"] for m, st in summary["methods"].items()},
    }


def versus(out: Path, rest: list[str]) -> str:
    """The job with :data:`PREVIOUS` and with today's defaults, one after the other; the table comparing them."""
    runs = {"previous": timed_run(out / "previous", [*rest, *PREVIOUS]), "today": timed_run(out / "today", rest)}
    (out / "versus.json").write_text(json.dumps(runs, indent=2))
    methods = list(runs["today"]["means"])
    head = ["defaults", "q", "local steps", "lr", "wall s", "training s", "training replica-forwards"]
    head += ["uplink B/client-round", "clients evaluated", *methods]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in runs.items():
        cells = [name, r["q"], r["local_steps"], f"{r['lr']:g}", f"{r['wall_s']:.0f}", f"{r['train_s']:.0f}"]
        cells += [r["train_replica_forwards"], f"{r['uplink_B_per_client_round']:.0f}", r["clients_evaluated"]]
        cells += [f"{r['means'].get(m, math.nan):.4f}" for m in methods]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    prev, now = runs["previous"], runs["today"]
    lines.append(
        f"\ntoday / previous: wall {now['wall_s'] / prev['wall_s']:.2f}x, "
        f"training {now['train_s'] / prev['train_s']:.2f}x, "
        f"forwards {now['train_replica_forwards'] / prev['train_replica_forwards']:.2f}x; mean held-out "
        f"{now['metric']} of the global B {now['means']['global']:.4f} against {prev['means']['global']:.4f}"
    )
    md = "\n".join(lines) + "\n"
    for name, r in runs.items():  # each run's main-job table
        run = Path(r["run"])
        md += f"\n{name} defaults: " + markdown(json.loads((run / "summary.json").read_text()), clients_of(run))
    (out / "versus.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other arguments: fedprge.simulate's")
    p.add_argument("--out", type=Path, default=Path("results/main_job"))
    p.add_argument("--versus", action="store_true", help="run the previous defaults and today's side by side")
    a, rest = p.parse_known_args(argv)
    if a.versus:
        a.out.mkdir(parents=True, exist_ok=True)
        print(versus(a.out, rest))
        print(f"results: {a.out}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "ray", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from fedprge.results import RunWriter
    from fedprge.simulate import parse_args, simulate

    cfg, no_progress, resume = parse_args(rest)
    if resume:
        p.error("--resume: use python -m fedprge.simulate --resume RUN_DIR")
    writer = RunWriter(cfg, out=a.out / "run", progress=not no_progress)
    summary = simulate(cfg, writer)
    md = markdown(summary, clients_of(writer.dir))
    (a.out / "main_job.md").write_text(md)
    print(md)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
