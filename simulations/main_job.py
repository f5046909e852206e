"""The main job: one ``python -m fedprge.simulate`` run into a results folder, and the README's table of it.

    python simulations/main_job.py                                # the defaults: SmolLM2, 50 Shakespeare roles
    python simulations/main_job.py --config configs/smoke.yaml    # the tiny model, about a minute

Every argument but ``--out`` goes to ``python -m fedprge.simulate`` unchanged. Besides the run folder
(``--out``/run: rounds.csv, clients.csv, summary.json, metric.png) it writes ``main_job.md``: per method the mean,
median and worst 10% of the held-out metric, on how many clients it beat ``global`` and kept the held-out loss
at or below the untuned model's, and the local step counts the validation chose.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from collections import Counter
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other arguments: fedprge.simulate's")
    p.add_argument("--out", type=Path, default=Path("results/main_job"))
    a, rest = p.parse_known_args(argv)
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
    with open(writer.dir / "clients.csv") as f:
        clients = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    md = markdown(summary, clients)
    (a.out / "main_job.md").write_text(md)
    print(md)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
