"""``python -m fedprge.compare``: what federated fine-tuning costs in bytes, method by method, on the same clients.

Runs every method on the same partition, seed and model and prints one table (metric reached, uplink and
downlink bytes per client-round, totals, wall time; the bytes, forward passes and training seconds each method
needed to reach a target metric, and the metric each reached within the forward budget of the cheapest method),
written as CSV and Markdown with a plot of metric vs cumulative bytes. ``--calculator`` instead predicts the
bytes of every method for a model (a Hugging Face config.json, no weights) and a fleet we cannot run here.

    python -m fedprge.compare                                   # SmolLM2, 10 clients, every method but full FedAvg
    python -m fedprge.compare --model tiny --methods all        # includes full-parameter FedAvg
    python -m fedprge.compare --calculator path/to/config.json --clients 100000 --rounds 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedprge.config import RunConfig, load_config
from fedprge.methods import METHODS  # method -> config overrides on top of the shared base

DEFAULT_METHODS = [m for m in METHODS if m != "fedavg-full"]
BASE = [
    "federation.clients=10",
    "federation.fraction=0.5",
    "federation.rounds=5",
    "eval.every=1",
    "eval.curve_clients=0",
    "eval.sync=false",  # evaluations send the dense B and sync nobody: train bytes are training's own
    "eval.personalization=[global]",
]


@dataclass
class Row:
    method: str
    metric: float
    untuned: float
    uplink_per_client_round: float
    downlink_per_client_round: float
    total_bytes: int
    seconds: float
    client_peak_mib: float  # largest peak RSS of a simulated client's process (Ray worker: model + Python + Ray)
    curve: list[dict[str, float]]  # from round 0, cumulative: bytes, forwards, backwards, seconds; and the metric
    metric_name: str  # the run's headline metric (RunWriter.metric): "loss" or "acc"
    higher_is_better: bool
    to_target: dict[str, float] | None = None  # the first curve point at or past the target (None: never)
    at_budget: float = math.nan  # the metric at the last evaluation within the cheapest method's forwards


def passes_per_client_round(cfg: RunConfig) -> tuple[int, int]:
    """(forward, backward) passes over one minibatch that one client makes in one round of training: a
    zeroth-order step is 2q replica-forwards (one batched call in P-RGE), a backprop step one of each."""
    steps = cfg.federation.local_steps
    return (2 * cfg.zo.q * steps, 0) if cfg.federation.algorithm == "prge" else (steps, steps)


def run_method(name: str, base: list[str], files: list[str], out: Path) -> Row:
    from fedprge.procmem import PeakMemory
    from fedprge.results import RunWriter
    from fedprge.simulate import simulate

    cfg = load_config(files, [*BASE, *base, *METHODS[name], f"name={name}"])
    writer = RunWriter(cfg, out=out / name, progress=False)
    with PeakMemory() as mem:
        summary = simulate(cfg, writer)
    fwd, bwd = passes_per_client_round(cfg)
    curve, cum = [], {"bytes": 0.0, "forwards": 0.0, "backwards": 0.0, "seconds": 0.0}
    for rnd in range(cfg.federation.rounds + 1):
        if rnd:  # the round's accepted client-rounds did the counted passes
            r = writer.rounds[rnd - 1]
            cum["bytes"] = float(r["cum_uplink_bytes"] + r["cum_downlink_bytes"])
            cum["forwards"] += fwd * r["ok"]
            cum["backwards"] += bwd * r["ok"]
            cum["seconds"] += r["seconds"]
        point = writer.curve_point(rnd)
        if point is not None:
            curve.append({**cum, "metric": point})
    b = summary["bytes"]
    return Row(
        name,
        summary["methods"]["global"]["mean"],
        summary["methods"]["untuned"]["mean"],
        summary["uplink_bytes_per_client_round"],
        summary["downlink_bytes_per_client_round"],
        int(b.get("train_up", 0) + b.get("train_down", 0)),
        summary["seconds"],
        mem.worker_peak / 2**20 if mem.worker_peak else math.nan,
        curve,
        summary["metric"],
        summary["higher_is_better"],
    )


def reaching(curve: list[dict[str, float]], target: float, higher: bool) -> dict[str, float] | None:
    """The first curve point whose metric reaches ``target`` (None if none does)."""
    return next((p for p in curve if (p["metric"] >= target if higher else p["metric"] <= target)), None)


def within(curve: list[dict[str, float]], forwards: float) -> float:
    """The metric of the last evaluation made within ``forwards`` cumulative forward passes."""
    return next((p["metric"] for p in reversed(curve) if p["forwards"] <= forwards), math.nan)


def write_outputs(rows: list[Row], out: Path, metric: str, target: float, budget: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedprge.results import write_csv

    fedavg = next((r for r in rows if r.method == "fedavg-lora-fa"), None)
    cols = ["method", f"final {metric}", "uplink B/client-round", "x smaller than FedAvg B", "downlink B/client-round"]
    cols += ["total bytes", "bytes to target", "forwards to target", "train s to target"]
    cols += [f"{metric} within {budget:,.0f} forwards", "seconds", "client peak MiB"]
    records = []
    for r in rows:
        ratio = fedavg.uplink_per_client_round / r.uplink_per_client_round if fedavg else math.nan
        hit = r.to_target or {}
        passes = _fmt(hit.get("forwards", math.nan), "not reached")
        if hit.get("backwards"):
            passes += f" (+{hit['backwards']:,.0f} backward)"
        records.append(
            [
                r.method,
                f"{r.metric:.4f}",
                f"{r.uplink_per_client_round:,.0f}",
                f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x",
                f"{r.downlink_per_client_round:,.0f}",
                f"{r.total_bytes:,}",
                _fmt(hit.get("bytes", math.nan), "not reached"),
                passes,
                _fmt(hit.get("seconds", math.nan), "not reached"),
                f"{r.at_budget:.4f}",
                f"{r.seconds:.0f}",
                _fmt(r.client_peak_mib),
            ]
        )
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for rec in records:
        table.add_row(*rec)
    Console(width=max(Console().width, 150)).print(table)
    keys = ["bytes", "forwards", "backwards", "seconds"]
    write_csv(
        out / "compare.csv",
        [
            {"method": r.method, "metric": r.metric, "untuned": r.untuned}
            | {"uplink_per_client_round": r.uplink_per_client_round}
            | {"downlink_per_client_round": r.downlink_per_client_round, "total_bytes": r.total_bytes}
            | {f"{k}_to_target": (r.to_target or {}).get(k, math.nan) for k in keys}
            | {"metric_within_budget": r.at_budget, "budget_forwards": budget, "target": target}
            | {"seconds": r.seconds, "client_peak_mib": r.client_peak_mib}
            for r in rows
        ],
    )
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(x) + " |" for x in records]
    (out / "compare.md").write_text(f"{title}\n\n" + "\n".join(md) + "\n")
    (out / "compare.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    plot(rows, out / "compare.png", metric, target, title)


def _fmt(x: float, missing: str = "-") -> str:
    return missing if math.isnan(x) else f"{x:,.0f}"


def plot(rows: list[Row], path: Path, metric: str, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        xs = [max(p["bytes"], 1) for p in r.curve]  # round 0 has sent nothing; place it at 1 byte on the log axis
        ax.plot(xs, [p["metric"] for p in r.curve], marker="o", label=r.method)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {metric} {target:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes exchanged in training, up + down (log scale; round 0 drawn at 1 byte)")
    unit = "per-token NLL, nats" if metric == "loss" else "fraction correct"
    ax.set_ylabel(f"mean held-out {metric} over all clients ({unit})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedprge.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", action="append", default=[], help="YAML file(s) for the shared base")
    p.add_argument("--model", help="tiny, smollm2 or a local HF folder")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"any of {list(METHODS)} or 'all'")
    p.add_argument("--out", default=None, help="results folder (default runs/compare-TIMESTAMP)")
    p.add_argument("--calculator", metavar="CONFIG_JSON", help="predict bytes for a model config (no run)")
    p.add_argument("--clients", type=int, help="clients (runs: federation.clients; calculator: fleet size)")
    p.add_argument("--rounds", type=int, help="rounds")
    p.add_argument(
        "--target",
        type=float,
        help="target metric for the *to target* columns (default: the level "
        "every method reached, the worst final metric)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every method")
    a = p.parse_intermixed_args(argv)
    if a.calculator:
        from fedprge.calculator import main as calc

        return calc(a.calculator, a.clients, a.rounds, a.overrides)
    methods = list(METHODS) if a.methods == ["all"] else a.methods
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)} or 'all'")
    base = list(a.overrides)
    base += [f"model.name={a.model}"] if a.model else []
    base += [f"federation.clients={a.clients}"] if a.clients else []
    base += [f"federation.rounds={a.rounds}"] if a.rounds else []
    try:
        cfg: RunConfig = load_config(a.config, [*BASE, *base])
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    out = Path(a.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, m in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {m}", flush=True)
        rows.append(run_method(m, base, a.config, out))
    rules = {(r.metric_name, r.higher_is_better) for r in rows}  # each run's writer decided (RunWriter.metric)
    if len(rules) != 1:
        raise RuntimeError(f"the methods' runs disagree on the headline metric: {sorted(rules)}")
    ((metric, higher),) = rules
    # target: the level every method reached (the smallest improvement over the untuned model), on the curves
    finals = [r.curve[-1]["metric"] if r.curve else r.metric for r in rows]
    target = a.target if a.target is not None else min(finals) if higher else max(finals)
    budget = min(r.curve[-1]["forwards"] for r in rows)  # the forwards every method spent: the cheapest one's total
    for r in rows:
        r.to_target, r.at_budget = reaching(r.curve, target, higher), within(r.curve, budget)
    fed = cfg.federation
    title = (
        f"{cfg.model.name} on {cfg.data.task}: {fed.clients} clients, {fed.fraction:g} per round, {fed.rounds} rounds,"
        f" {fed.local_steps} local steps; target {metric} {target:.4f}"
    )
    write_outputs(rows, out, metric, target, budget, title)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
