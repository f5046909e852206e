"""What a finished run shows: the terminal table of the summary and the metric-vs-round/bytes plot."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

log = logging.getLogger("fedprge.results")


def print_summary(console: Console, s: dict[str, Any], run_dir: Path) -> None:
    """The per-method table (trained and newcomer clients apart), who is missing, the bytes, privacy spent."""
    name, n, m = s["metric"], s["clients_evaluated"], s["clients_expected"]
    better = "higher" if s["higher_is_better"] else "lower"
    table = Table(title=f"per-client held-out {name}, {n} of {m} clients ({better} is better)")
    for col in ("method", "clients", "mean", "median", "worst 10%"):
        table.add_column(col, justify="right" if col != "method" else "left")
    groups = [("", s["methods"])]
    if s["unseen_clients"]:  # newcomers apart: the methods' way of adapting a client that never trained
        groups = [("trained: ", s["methods_trained"]), ("unseen: ", s["methods_unseen"])]
    for prefix, stats in groups:
        for meth, st in stats.items():
            cells = (f"{st['mean']:.4f}", f"{st['median']:.4f}", f"{st['worst10']:.4f}")
            table.add_row(prefix + meth, str(st["clients"]), *cells)
    console.print(table)
    if s["missing"]:
        console.print(Text(f"{m - n} of {m} clients not evaluated: {_names(s['missing'])}", "bold red"))
        log.warning("%d of %d clients not evaluated: %s", m - n, m, _names(s["missing"]))
    if s["missing_untuned"]:
        console.print(Text(f"no untuned metric, not compared: {_names(s['missing_untuned'])}", "red"))
        log.warning("no untuned metric, left out of the comparison: %s", _names(s["missing_untuned"]))
    b = s["bytes"]
    console.print(
        f"uplink {s['uplink_bytes_per_client_round']:.0f} B per client-round "
        f"(dense fp32 B would be {s['adapter_bytes_fp32']:,} B); downlink "
        f"{s['downlink_bytes_per_client_round']:.0f} B per client-round; train totals up "
        f"{b.get('train_up', 0):,} B, down {b.get('train_down', 0):,} B; "
        f"global B improved {s['clients_improved_by_global']}/{s['clients_compared']} clients "
        f"(those with both metrics); {s['seconds']:.0f} s. Results: {run_dir}"
    )
    if "privacy" in s:  # DP-ZO: what the run spent, per user (one client's whole round)
        p = s["privacy"]
        table = Table(title=f"privacy spent ({p['mode']} DP, unit: one client's round; {p['accountant']})")
        for col in ("epsilon", "delta", "noise multiplier", "clip", "sample rate", "rounds", "eps, sample known"):
            table.add_column(col, justify="right")
        table.add_row(
            *(f"{p[k]:.4g}" for k in ("epsilon", "delta", "noise_multiplier", "clip", "sample_rate")),
            str(p["rounds"]),
            f"{p['epsilon_sample_known']:.4g}",
        )
        console.print(table)


def plot_metric(path: Path, pts: list[tuple[int, float]], cum: dict[int, float], ylabel: str, title: str) -> None:
    """The curve ``pts`` (round, metric) against the round and against the cumulative bytes ``cum[round]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax1.set_xlabel("round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.plot([cum.get(p[0], math.nan) / 1e3 for p in pts], [p[1] for p in pts], marker="o")
    ax2.set_xlabel("cumulative bytes, up + down (kB)")
    for ax in (ax1, ax2):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _names(missing: list[dict[str, Any]]) -> str:
    return "; ".join(f"client {m['partition']} ({m['reason']})" for m in missing)
