"""Communication cost against accuracy: ``python -m fedprge.compare`` as the README's table ran, into one folder.

    python simulations/compare.py                                  # SmolLM2, 10 clients, 3 rounds (~27 min)
    python simulations/compare.py --model tiny                     # a few minutes

Every argument but ``--out`` goes to ``python -m fedprge.compare`` after the README table's settings (``--rounds 3
model.precision=float32 zo.clip=0``: it was measured before shared-bf16 and the step rule became the defaults), so
a later one wins. Besides compare's own ``compare.csv`` / ``.md`` / ``.json`` / ``.png`` it writes
``progress.md``: per method the headline metric's change from the untuned model (with perplexities for the loss)
and that change as a share of FedAvg-of-LoRA-FA's, the README's "P-RGE made N% of first-order progress".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

README_TABLE = ["--rounds", "3", "model.precision=float32", "zo.clip=0"]


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
    a, rest = p.parse_known_args(argv)
    from fedprge.compare import main as compare

    if rc := compare([*README_TABLE, "--out", str(a.out), *rest]):
        return rc
    md = progress(json.loads((a.out / "compare.json").read_text()))
    (a.out / "progress.md").write_text(md)
    print(md)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
