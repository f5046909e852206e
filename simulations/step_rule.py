"""The step rule on label-skewed tweets: held-out loss and accuracy after local P-RGE steps, with and without it.

    python simulations/step_rule.py                   # SmolLM2, tweets Dirichlet alpha 0.1, clients 0-3, 10 steps
    python simulations/step_rule.py --seeds 0 1 2     # three run seeds (partition, minibatches, directions)
    python simulations/step_rule.py --model tiny --steps 3

Each client takes ``--steps`` local P-RGE steps from zero B (``Task.local_steps``, the personalization path) under
each ``zo.clip`` in ``--clips`` (0: no rule): the same forwards for every rule. Prints a table per client and one
over seeds (per rule the clients' mean held-out loss and accuracy, and the paired change against the first rule: mean +-
std over seeds, ddof 1); writes ``step_rule.csv`` / ``.json`` and ``step_rule_seeds.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clips", nargs="+", type=float, default=[0.0, 2.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds (each draws its own partition)")
    p.add_argument("--out", type=Path, default=Path("results/step_rule"))
    a = p.parse_args(argv)
    from fedprge.config import load_config
    from fedprge.task import Task

    torch.set_num_threads(1)
    base = ["data.task=tweets", "data.partition=dirichlet", "data.alpha=0.1", "federation.clients=20"]
    base += ["federation.batch_size=2", "data.max_test_per_client=16", f"model.name={a.model}"]
    rows = []
    for seed in a.seeds:
        task = Task(load_config([], [*base, f"seed={seed}"]))
        for part in a.clients:
            zero = torch.zeros(task.num_params)
            row = {"seed": seed, "client": part, "untuned": task.evaluate(zero, part)}
            for clip in a.clips:
                task.zo = load_config([], [*base, f"zo.clip={clip}"]).zo_config()  # the step rule of this column
                b = task.local_steps(zero, part, a.steps, tag=2)
                row[f"clip={clip:g}"] = {**task.evaluate(b, part), "b_norm": float(b.norm())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "step_rule.json").write_text(json.dumps(rows, indent=2))
    cols = ["untuned", *[f"clip={c:g}" for c in a.clips]]
    with open(a.out / "step_rule.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "client", *[f"{c} {k}" for c in cols for k in ("loss", "acc")]])
        for r in rows:
            w.writerow([r["seed"], r["client"], *[f"{r[c][k]:.4f}" for c in cols for k in ("loss", "acc")]])
    print(f"\n| seed | client | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for r in rows:
        cells = " | ".join(f"{r[c]['loss']:.3f} / {r[c]['acc']:.3f}" for c in cols)
        print(f"| {r['seed']} | {r['client']} | {cells} |")
    summary = over_seeds(rows, cols)
    (a.out / "step_rule_seeds.json").write_text(json.dumps(summary, indent=2))
    print(f"\nover {len(a.seeds)} seed(s), clients {a.clients}: mean over clients, then mean ± std over seeds")
    print(f"| rule | loss | acc | loss change vs {cols[1]} | acc change vs {cols[1]} |\n|---|---|---|---|---|")
    for c, st in summary.items():
        cells = [f"{st[k]:.3f} ± {st[k + '_std']:.3f}" for k in ("loss", "acc", "d_loss", "d_acc")]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(f"(held-out loss / accuracy after {a.steps} local steps; results: {a.out})")
    return 0


def over_seeds(rows: list[dict], cols: list[str]) -> dict[str, dict[str, float]]:
    """Per column: the clients' mean held-out loss / accuracy per seed, and its paired change against ``cols[1]``
    (the first rule) on the same seed; mean and std (ddof 1; 0 with one seed) over seeds."""
    seeds = sorted({r["seed"] for r in rows})
    out = {}
    for c in cols:
        per_seed = {k: [] for k in ("loss", "acc", "d_loss", "d_acc")}
        for s in seeds:
            mine = [r for r in rows if r["seed"] == s]
            for k in ("loss", "acc"):
                v = np.mean([r[c][k] for r in mine])
                per_seed[k].append(v)
                per_seed[f"d_{k}"].append(v - np.mean([r[cols[1]][k] for r in mine]))
        out[c] = {}
        for k, v in per_seed.items():
            out[c][k], out[c][f"{k}_std"] = float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return out


if __name__ == "__main__":
    sys.exit(main())
