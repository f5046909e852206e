"""Faults and hostile clients: dropped clients, and one client in ten poisoning its update.

    python simulations/reliability.py                              # the tiny model (~10 min)
    python simulations/reliability.py --model smollm2              # SmolLM2 on Shakespeare, the main job's model
    python simulations/reliability.py --rounds 2 --poison-rounds 2 # a quick look

Drops: 20 clients, 10 per round, ``--rounds`` rounds, clean and with ``faults.drop_rate=0.3``. Poisoning: 10 clients,
5 per round, ``--poison-rounds`` rounds, clean, one client in ten sending -100x its scalars under the default
defences, and the same without them (``norm_bound=0``, ``max_abs_grad=0``). Besides the held-out loss, each global
B is scored on the clients' own training text: a random model's held-out loss barely moves, its training-text
loss is what the federation minimizes. Writes ``reliability.md`` / ``.json`` and each run's folder to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import SMOKE  # noqa: E402 - the sibling study script: configs/smoke.yaml from any directory

BASE = {"tiny": [SMOKE], "smollm2": []}  # smollm2: the defaults (the main job's model and data)
COMMON = ["eval.personalization=[global]", "eval.every=0", "federation.fraction=0.5"]
DROP = ["faults.drop_rate=0.3"]
POISON = ["faults.poison_fraction=0.1", "faults.poison_kind=scaled"]  # -100 x the scalars (poison_scale)
UNDEFENDED = ["federation.norm_bound=0", "federation.max_abs_grad=0"]


def run(name: str, overrides: list[str], out: Path, model: str = "tiny") -> dict:
    """One simulation; its summary, rounds and global B, and that B's loss on the clients' training text."""
    from fedprge.config import load_config, to_yaml
    from fedprge.evaluate import evaluate
    from fedprge.results import RunWriter
    from fedprge.simulate import simulate
    from fedprge.task import load_task

    cfg = load_config(BASE[model], [*COMMON, *overrides, f"name={name}"])
    writer = RunWriter(cfg, out=out / name, progress=False)
    summary = simulate(cfg, writer)
    b = torch.load(writer.dir / "global_b.pt")
    task = load_task(to_yaml(cfg))

    def train_text_loss(b: torch.Tensor) -> float:
        parts = range(cfg.federation.clients)
        args = (task.backend, task.tokenizer, b)
        return float(np.mean([evaluate(*args, task.client(p).train, cfg.data.max_len)["loss"] for p in parts]))

    return {
        "summary": summary,
        "rounds": writer.rounds,
        "b": b,
        "train_loss": train_text_loss(b),
        "untrained_loss": train_text_loss(torch.zeros_like(b)),
    }


def drops_table(clean: dict, drop: dict) -> str:
    untuned, untrained = clean["summary"]["methods"]["untuned"]["mean"], clean["untrained_loss"]
    gain = untrained - clean["train_loss"]
    lines = [
        f"| run | accepted replies | failed | rounds skipped | held-out loss, global B (untuned {untuned:.4f}) "
        f"| loss on the clients' training text (untrained {untrained:.4f}) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("clean", clean), ("30% drop", drop)):
        rows = r["rounds"]
        ok, sampled = sum(int(x["ok"]) for x in rows), sum(int(x["sampled"]) for x in rows)
        kept = "" if r is clean else f" ({(untrained - r['train_loss']) / gain:.0%} of the clean gain)"
        lines.append(
            f"| {name} | {ok}/{sampled} | {sum(int(x['failed']) for x in rows)} | "
            f"{sum(bool(x['skipped']) for x in rows)} | {r['summary']['methods']['global']['mean']:.4f} | "
            f"{r['train_loss']:.4f}{kept} |"
        )
    return "\n".join(lines) + "\n"


def poison_table(clean: dict, defended: dict, undefended: dict) -> str:
    untrained = clean["untrained_loss"]
    gain, scale = untrained - clean["train_loss"], float(clean["b"].norm())
    lines = [
        f"| run | clipped client-rounds | distance of B from the clean B (x the clean B's norm) | training-text loss "
        f"(untrained {untrained:.4f}, clean {clean['train_loss']:.4f}) | share of the clean gain |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("defended", defended), ("undefended", undefended)):
        clipped = sum(int(x["clipped"]) for x in r["rounds"])
        distance = float((r["b"] - clean["b"]).norm()) / scale
        share = (untrained - r["train_loss"]) / gain
        lines.append(f"| {name} | {clipped} | {distance:.2f} | {r['train_loss']:.4f} | {share:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="rounds of the drop runs (20 clients)")
    p.add_argument("--poison-rounds", type=int, default=4, help="rounds of the poisoning runs (10 clients)")
    p.add_argument("--model", choices=list(BASE), default="tiny")
    p.add_argument("--out", type=Path, default=None, help="default: results/reliability[-smollm2]")
    a = p.parse_args(argv)
    a.out = a.out or Path("results/reliability" + ("" if a.model == "tiny" else f"-{a.model}"))
    twenty = ["federation.clients=20", f"federation.rounds={a.rounds}"]
    ten = ["federation.clients=10", f"federation.rounds={a.poison_rounds}"]
    runs = {
        "clean-20": run("clean-20", twenty, a.out, a.model),
        "drop-20": run("drop-20", twenty + DROP, a.out, a.model),
        "clean-10": run("clean-10", ten, a.out, a.model),
        "poisoned-10": run("poisoned-10", ten + POISON, a.out, a.model),
        "undefended-10": run("undefended-10", ten + POISON + UNDEFENDED, a.out, a.model),
    }
    md = (
        f"Model: {a.model}. Dropped clients (20 clients, 10 per round, {a.rounds} rounds):\n\n"
        + drops_table(runs["clean-20"], runs["drop-20"])
        + f"\nOne client in ten sending -100x its scalars (10 clients, 5 per round, {a.poison_rounds} rounds):\n\n"
        + poison_table(runs["clean-10"], runs["poisoned-10"], runs["undefended-10"])
    )
    (a.out / "reliability.md").write_text(md)
    record = {
        name: {
            "global_loss": r["summary"]["methods"]["global"]["mean"],
            "train_text_loss": r["train_loss"],
            "untrained_train_text_loss": r["untrained_loss"],
            "b_sha256": r["summary"]["b_sha256"],
        }
        for name, r in runs.items()
    }
    (a.out / "reliability.json").write_text(json.dumps(record, indent=2))
    print(md)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
