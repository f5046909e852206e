"""The step rule on label-skewed tweets: held-out loss and accuracy after local P-RGE steps, with and without it.

    python simulations/step_rule.py                   # SmolLM2, tweets Dirichlet alpha 0.1, clients 0-3, 10 steps
    python simulations/step_rule.py --model tiny --steps 3

Each client takes ``--steps`` local P-RGE steps from zero B (``Task.local_steps``, the personalization path) under
each ``zo.clip`` in ``--clips`` (0: no rule); prints a table and writes ``step_rule.csv`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clips", nargs="+", type=float, default=[0.0, 2.0])
    p.add_argument("--out", type=Path, default=Path("results/step_rule"))
    a = p.parse_args(argv)
    from fedprge.config import load_config
    from fedprge.task import Task

    torch.set_num_threads(1)
    base = ["data.task=tweets", "data.partition=dirichlet", "data.alpha=0.1", "federation.clients=20"]
    base += ["federation.batch_size=2", "data.max_test_per_client=16", f"model.name={a.model}"]
    task = Task(load_config([], base))
    rows = []
    for part in a.clients:
        zero = torch.zeros(task.num_params)
        row = {"client": part, "untuned": task.evaluate(zero, part)}
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
        w.writerow(["client", *[f"{c} {k}" for c in cols for k in ("loss", "acc")]])
        for r in rows:
            w.writerow([r["client"], *[f"{r[c][k]:.4f}" for c in cols for k in ("loss", "acc")]])
    print(f"\n| client | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for r in rows:
        print(f"| {r['client']} | " + " | ".join(f"{r[c]['loss']:.3f} / {r[c]['acc']:.3f}" for c in cols) + " |")
    print(f"(held-out loss / accuracy after {a.steps} local steps; results: {a.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
