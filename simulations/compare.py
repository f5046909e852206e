"""Cost to a target: ``python -m fedprge.compare`` on Shakespeare (loss) and on tweets (accuracy), one folder each.

    python simulations/compare.py                                  # SmolLM2, both tasks, 4 methods, 3 rounds
    python simulations/compare.py --settings shakespeare --methods all-but-full model.precision=float32 zo.clip=0
    python simulations/compare.py --model tiny --settings tweets   # a few minutes

Per setting, compare runs P-RGE with today's defaults (``prge-seeds``), MeZO, FedKSeed and FedAvg of LoRA-FA B on
the same clients and schedule (``--methods``; ``all-but-full`` is compare's own default set), and its table gives
each method's bytes, forward passes and training seconds to the target (the metric every method reached) and its
metric within the cheapest method's forwards. Other arguments go to ``python -m fedprge.compare`` after the
setting's, so a later one wins; the second line above is the README's older byte table (measured in fp32 without
the step rule). Besides compare's ``compare.csv`` / ``.md`` / ``.json`` / ``.png`` in ``--out/SETTING`` it writes
``progress.md`` there: per method the metric's change from the untuned model (with perplexities for the loss) and
that change as a share of FedAvg-of-LoRA-FA's, the README's "P-RGE made N% of first-order progress".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import TWEETS  # noqa: E402 - the sibling study script

SETTINGS = {"shakespeare": ["--rounds", "3"], "tweets": ["--rounds", "3", *TWEETS, "data.alpha=1.0"]}
METHODS = ["prge-seeds", "mezo", "fedkseed", "fedavg-lora-fa"]


def progress(rows: list[dict]) -> str:
    metric = rows[0]["metric_name"]
    ref = next((r for r in rows if r["method"] == "fedavg-lora-fa"), None)
    ppl = metric == "loss"  # a per-token NLL: its perplexity is exp(loss)
    cols = ["method", f"untuned {metric}", f"final {metric}", "change", "share of fedavg-lora-fa's change"]
    cols += ["perplexity untuned -> final"] if ppl else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        change = r["metric"] - r["untuned"]
        share = change / (ref["metric"] - ref["untuned"]) if ref and ref["metric"] != ref["untuned"] else math.nan
        cells = [r["method"], f"{r['untuned']:.4f}", f"{r['metric']:.4f}", f"{change:+.4f}", f"{share:.0%}"]
        cells += [f"{math.exp(r['untuned']):.1f} -> {math.exp(r['metric']):.1f}"] if ppl else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other arguments: fedprge.compare's")
    p.add_argument("--out", type=Path, default=Path("results/compare"))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=METHODS, help="compare's methods, or all-but-full (its default)")
    a, rest = p.parse_known_args(argv)
    from fedprge.compare import DEFAULT_METHODS
    from fedprge.compare import main as compare

    methods = DEFAULT_METHODS if a.methods == ["all-but-full"] else a.methods
    for setting in a.settings:
        out = a.out / setting
        if rc := compare([*SETTINGS[setting], "--methods", *methods, "--out", str(out), *rest]):
            return rc
        md = progress(json.loads((out / "compare.json").read_text()))
        (out / "progress.md").write_text(md)
        print(md)
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
