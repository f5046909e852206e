"""Personalization study: every method side by side, per client, over three run seeds.

    python simulations/personalization.py                          # SmolLM2: Shakespeare + tweets (alpha 0.1, 1.0)
    python simulations/personalization.py --settings tweets-0.1 --seeds 0 1 2
    python simulations/personalization.py --quick                  # tiny model, one seed, a minute (the test)

Each (setting, seed) is one ``python -m fedprge.simulate`` run in its own process (run folders under
``--out``): ``shakespeare`` is the main job as it is (its default methods), the tweets settings run every method
(Ditto included) with a 10-step budget, newcomers and the step-budget trace. The table is computed from the runs'
``clients.csv``. Per method and client group (clients that trained, and the ``eval.unseen_fraction`` newcomers
that never did): mean / median / worst-10% of the held-out metric, the share of clients better than ``global`` and
than ``local``, the share whose held-out loss is no worse than the untuned model's, each as mean +- std over
seeds; and the bytes per client-round the federation sent.
Writes ``personalization.csv`` / ``.md`` / ``.json`` and ``personalization.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ["global", "finetune", "local", "personal", "ditto", "mix", "prior"]
COMMON = [
    f"eval.personalization=[{','.join(METHODS)}]",
    "eval.unseen_fraction=0.2",
    "eval.personal_steps=10",
    "eval.every=0",
    "eval.trace=true",
    "eval.timeout_s=3600",  # one client's evaluation (7 methods, 10 steps, trace) can take many minutes when loaded
]
SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")  # the tiny model, from any working dir
SMOLLM2 = ["model.precision=shared-bf16"]
TWEETS = [
    "data.task=tweets",
    "data.partition=dirichlet",
    "federation.clients=20",
    "federation.fraction=0.5",
    "federation.batch_size=2",
    "data.max_test_per_client=16",
]
SETTINGS = {
    # the main job as it is (its default methods; Ditto and mix would double every sampled client's forwards)
    "shakespeare": ["federation.clients=50"],
    "tweets-0.1": [*TWEETS, "data.alpha=0.1", *COMMON],
    "tweets-1.0": [*TWEETS, "data.alpha=1.0", *COMMON],
}
QUICK = ["federation.clients=5", "eval.personal_steps=4", "data.max_test_per_client=4", "federation.batch_size=2"]


def finished(folder: Path) -> Path | None:
    """The newest run under ``folder`` that evaluated every client (with its untuned metric), if any."""
    if done := sorted(folder.glob("*/summary.json")):
        summary = json.loads(done[-1].read_text())
        if summary["clients_evaluated"] == summary["clients_expected"] and not summary["missing_untuned"]:
            return done[-1].parent
        print(
            f"{done[-1].parent} evaluated {summary['clients_evaluated']} of {summary['clients_expected']} clients; "
            "running it again",
            flush=True,
        )
    return None


def launch(folder: Path, args: list[str], label: str) -> Path:
    """``python -m fedprge.simulate *args`` into ``folder`` in its own process; returns the run folder (a finished
    run there is reused, an unfinished one started over)."""
    if done := finished(folder):
        return done
    args = [*args, "--out", str(folder), "--no-progress"]
    t0 = time.monotonic()
    for attempt in (1, 2):  # a run killed from outside (say, its Ray node) is started over once, from scratch
        for stale in folder.glob("*/config.yaml"):
            shutil.rmtree(stale.parent)
        code = subprocess.run([sys.executable, "-m", "fedprge.simulate", *args]).returncode
        if code == 0:
            break
        print(f"{label}: attempt {attempt} failed (exit {code})", flush=True)
    else:
        raise RuntimeError(f"{label} failed twice; see its log above and {folder}")
    print(f"{label}: {time.monotonic() - t0:.0f} s -> {folder}", flush=True)
    return sorted(folder.glob("*/summary.json"))[-1].parent


def run(setting: str, seed: int, out: Path, quick: bool) -> Path:
    """One federation of the study in its own process; returns its run folder."""
    args = [*SETTINGS[setting], f"seed={seed}", f"name={setting}"]
    args = ["--config", SMOKE, *args, *QUICK] if quick else [*SMOLLM2, *args]
    return launch(out / f"{setting}-seed{seed}", args, f"{setting} seed {seed}")


def read_run(folder: Path) -> tuple[dict, list[dict[str, float]], set[int]]:
    """(summary, per-client rows, the unseen partitions) of one finished run."""
    from fedprge.config import load_config
    from fedprge.federation.sampling import unseen_clients

    summary = json.loads((folder / "summary.json").read_text())
    with open(folder / "clients.csv") as f:
        rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
    cfg = load_config([folder / "config.yaml"])
    return summary, rows, set(unseen_clients(cfg, cfg.federation.clients))


def group_stats(rows: list[dict[str, float]], method: str, metric: str, higher: bool) -> dict[str, float]:
    """One seed's statistics of ``method`` over ``rows`` (clients)."""
    from fedprge.results import client_stats

    vals = [r[f"{method}_{metric}"] for r in rows]
    out = client_stats(vals, higher)
    if method == "untuned":
        return out
    sign = 1 if higher else -1
    for ref in ("global", "local"):
        diff = [sign * (r[f"{method}_{metric}"] - r[f"{ref}_{metric}"]) for r in rows]
        out[f"better_than_{ref}"] = float(np.mean([d > 0 for d in diff]))
        if ref == "global":  # paired on the same clients: a seed's partition and untuned model cancel out
            out["gain_over_global"] = float(np.mean(diff))
    out["loss_no_worse_than_untuned"] = float(np.mean([r[f"{method}_loss"] <= r["untuned_loss"] + 1e-9 for r in rows]))
    return out


def table(runs: dict[str, list[Path]]) -> list[dict]:
    """Rows of the study table: mean and std over seeds of each statistic."""
    out = []
    for setting, folders in runs.items():
        per_seed: dict[tuple[str, str], list[dict[str, float]]] = {}
        up, down = [], []
        for folder in folders:
            summary, rows, unseen = read_run(folder)
            metric, higher = summary["metric"], summary["higher_is_better"]
            up.append(summary["uplink_bytes_per_client_round"])
            down.append(summary["downlink_bytes_per_client_round"])
            groups = {"trained": [r for r in rows if int(r["partition"]) not in unseen]}
            groups["unseen"] = [r for r in rows if int(r["partition"]) in unseen]
            methods = [m for m in ["untuned", *METHODS] if f"{m}_{metric}" in rows[0]]  # those the run evaluated
            for group, members in groups.items():
                for method in methods if members else []:
                    stats = group_stats(members, method, metric, higher)
                    per_seed.setdefault((group, method), []).append(stats)
        for (group, method), seeds in per_seed.items():
            row = {"setting": setting, "clients": group, "method": method, "metric": metric, "seeds": len(seeds)}
            for key in seeds[0]:
                v = np.array([s[key] for s in seeds])
                row[key], row[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row["uplink_B_per_client_round"] = float(np.mean(up))
            row["downlink_B_per_client_round"] = float(np.mean(down))
            out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    cols = [
        "mean",
        "median",
        "worst10",
        "gain_over_global",
        "better_than_global",
        "better_than_local",
        "loss_no_worse_than_untuned",
    ]
    head = "| setting | clients | method | " + " | ".join(cols) + " |\n|" + "---|" * (3 + len(cols)) + "\n"
    lines = []
    for r in rows:
        cells = []
        for c in cols:
            if c not in r:
                cells.append("")
            else:
                pct = c.startswith(("better", "loss_no"))
                f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.4f}")
                cells.append(f"{f(r[c])} ± {f(r[c + '_std'])}" if r["seeds"] > 1 else f(r[c]))  # one seed: no spread
        lines.append(f"| {r['setting']} ({r['metric']}) | {r['clients']} | {r['method']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(runs: dict[str, list[Path]], path: Path) -> None:
    """Left: per-client global vs best personalized metric; right: mean gain over global vs the local step budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4 * len(runs)), squeeze=False)
    for (setting, folders), (ax1, ax2) in zip(runs.items(), axes, strict=True):
        summaries = [read_run(f) for f in folders]
        metric, higher = summaries[0][0]["metric"], summaries[0][0]["higher_is_better"]
        for method, marker, color in (
            ("finetune", "o", "C0"),
            ("mix", "^", "C2"),
            ("prior", "s", "C3"),
            ("local", "x", "C1"),
        ):
            if f"{method}_{metric}" not in summaries[0][1][0]:
                continue
            xs = [r[f"global_{metric}"] for _, rows, _ in summaries for r in rows]
            ys = [r[f"{method}_{metric}"] for _, rows, _ in summaries for r in rows]
            ax1.scatter(xs, ys, s=14, marker=marker, color=color, alpha=0.6, label=method)
        lo, hi = ax1.get_xlim()
        ax1.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax1.set_xlabel(f"global B: held-out {metric}")
        ax1.set_ylabel(f"personalized: held-out {metric}")
        ax1.set_title(f"{setting}: per client and seed ({'above' if higher else 'below'}: better)")
        ax1.legend()
        for method in ("finetune", "local"):
            budgets = sorted(
                {int(k.split("@")[1].split("_")[0]) for k in summaries[0][1][0] if k.startswith(f"{method}@")}
            )
            gains = np.array(
                [
                    [np.mean([r[f"{method}@{k}_{metric}"] - r[f"global_{metric}"] for r in rows]) for k in budgets]
                    for _, rows, _ in summaries
                ]
            )
            if gains.size:
                ax2.errorbar(
                    budgets,
                    gains.mean(0),
                    yerr=gains.std(0),
                    marker="o",
                    capsize=3,
                    label=method,
                    color="C0" if method == "finetune" else "C1",
                )
        ax2.axhline(0, color="grey", lw=1)
        ax2.set_xscale("symlog", linthresh=1)
        ax2.set_xlabel("local P-RGE steps (fixed budget, no validation choice)")
        ax2.set_ylabel(f"mean held-out {metric} minus global's")
        ax2.set_title(f"{setting}: gain vs step budget (± std over seeds)")
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend()
        else:
            ax2.text(0.5, 0.5, "no step-budget trace in this setting", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("results/personalization"))
    p.add_argument("--quick", action="store_true", help="the tiny model on a 5-client smoke setup (for tests)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = {s: [run(s, seed, a.out, a.quick) for seed in a.seeds] for s in a.settings}
    rows = table(runs)
    from fedprge.results import write_rows

    write_rows(a.out / "personalization", rows)
    md = markdown(rows)
    (a.out / "personalization.md").write_text(md)
    plot(runs, a.out / "personalization.png")
    print(md)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
