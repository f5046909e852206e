"""The run folder: resolved config, per-round and per-client metrics (CSV/JSON), summary, plot, terminal table."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedprge.config import RunConfig, to_yaml

if TYPE_CHECKING:
    from fedprge.federation.server_app import Traffic


def client_stats(values: list[float], higher_is_better: bool) -> dict[str, float]:
    """Mean, median and the mean of the worst 10% of clients (at least one client)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if not higher_is_better:
        v = v[::-1]
    k = max(1, math.ceil(0.1 * len(v)))
    return {"mean": float(v.mean()), "median": float(np.median(v)), "worst10": float(v[:k].mean())}


class RunWriter:
    """Collects a run's results and writes them under ``out_dir/name-timestamp/``."""

    def __init__(
        self, cfg: RunConfig, out: str | Path | None = None, progress: bool = True, console: Console | None = None
    ) -> None:
        self.cfg = cfg
        self.dir = Path(out) if out else Path(cfg.out_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self.progress = progress
        self.console = console or Console()
        self.rounds: list[dict[str, Any]] = []
        self.evals: dict[int, list[dict[str, float]]] = {}
        self.summary: dict[str, Any] = {}
        self.curve_partitions: set[int] | None = None  # the clients the per-round curve averages (None: all)

    @property
    def metric(self) -> tuple[str, bool]:
        """The headline per-client metric and whether higher is better."""
        return ("acc", True) if self.cfg.data.task == "tweets" or self._has_acc() else ("loss", False)

    def _has_acc(self) -> bool:
        return any("global_acc" in r for rows in self.evals.values() for r in rows)

    def evaluation(self, rnd: int, rows: list[dict[str, float]]) -> None:
        self.evals[rnd] = rows

    def curve_point(self, rnd: int) -> float | None:
        """Mean global metric of round ``rnd`` over the curve clients, if that round was evaluated."""
        name, _ = self.metric
        rows = [
            r[f"global_{name}"]
            for r in self.evals.get(rnd, [])
            if f"global_{name}" in r and (self.curve_partitions is None or int(r["partition"]) in self.curve_partitions)
        ]
        return float(np.mean(rows)) if rows else None

    def last_eval(self, rnd: int) -> dict[str, float]:
        point = self.curve_point(rnd)
        return {} if point is None else {f"curve_global_{self.metric[0]}": point}

    def round(self, row: dict[str, Any], eval_row: dict[str, float]) -> None:
        prev = self.rounds[-1] if self.rounds else {"cum_uplink_bytes": 0, "cum_downlink_bytes": 0}
        row = {**row, **eval_row}
        row["cum_uplink_bytes"] = prev["cum_uplink_bytes"] + row["uplink_bytes"]
        row["cum_downlink_bytes"] = prev["cum_downlink_bytes"] + row["downlink_bytes"]
        self.rounds.append(row)
        _write_csv(self.dir / "rounds.csv", self.rounds)

    def finish(
        self, b: torch.Tensor, traffic: Traffic, before: list[dict], after: list[dict], seconds: float, num_params: int
    ) -> dict[str, Any]:
        name, higher = self.metric
        untuned = {int(r["partition"]): r[f"global_{name}"] for r in before if f"global_{name}" in r}
        per_client = []
        for r in after:
            row = {"partition": int(r["partition"]), f"untuned_{name}": untuned.get(int(r["partition"]), math.nan)}
            row.update({k: v for k, v in r.items() if k != "partition"})
            per_client.append(row)
        _write_csv(self.dir / "clients.csv", per_client)
        methods = {}
        for m in ["untuned", *self.cfg.eval.personalization]:
            key = f"{m}_{name}"
            vals = [r[key] for r in per_client if key in r and not math.isnan(r[key])]
            if vals:
                methods[m] = client_stats(vals, higher)
        improved = [r for r in per_client if f"global_{name}" in r]
        better = sum(
            (r[f"global_{name}"] > r[f"untuned_{name}"]) == higher and r[f"global_{name}"] != r[f"untuned_{name}"]
            for r in improved
        )
        ok_rounds = [r for r in self.rounds if r["ok"]]
        self.summary = {
            "metric": name,
            "higher_is_better": higher,
            "methods": methods,
            "clients_improved_by_global": better,
            "clients_evaluated": len(improved),
            "bytes": dict(traffic.bytes),
            "payload_bytes": dict(traffic.payload),
            "messages": dict(traffic.count),
            "uplink_bytes_per_client_round": float(np.mean([r["uplink_bytes_per_client"] for r in ok_rounds]))
            if ok_rounds
            else math.nan,
            "downlink_bytes_per_client_round": float(np.mean([r["downlink_bytes_per_client"] for r in self.rounds])),
            "adapter_params": num_params,
            "adapter_bytes_fp32": 4 * num_params,
            "rounds": len(self.rounds),
            "seconds": seconds,
            "b_norm": float(b.norm()),
            "b_sha256": _sha(b),
        }
        torch.save(b, self.dir / "global_b.pt")
        (self.dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        (self.dir / "rounds.json").write_text(json.dumps(self.rounds, indent=2))
        self.plot()
        self.print_summary()
        return self.summary

    def print_summary(self) -> None:
        s, name = self.summary, self.summary["metric"]
        table = Table(title=f"per-client held-out {name} ({'higher' if s['higher_is_better'] else 'lower'} is better)")
        for col in ("method", "mean", "median", "worst 10%"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for m, st in s["methods"].items():
            table.add_row(m, f"{st['mean']:.4f}", f"{st['median']:.4f}", f"{st['worst10']:.4f}")
        self.console.print(table)
        b = s["bytes"]
        self.console.print(
            f"uplink {s['uplink_bytes_per_client_round']:.0f} B per client-round "
            f"(dense fp32 B would be {s['adapter_bytes_fp32']:,} B); downlink "
            f"{s['downlink_bytes_per_client_round']:.0f} B per client-round; train totals up "
            f"{b.get('train_up', 0):,} B, down {b.get('train_down', 0):,} B; "
            f"global B improved {s['clients_improved_by_global']}/{s['clients_evaluated']} clients; "
            f"{s['seconds']:.0f} s. Results: {self.dir}"
        )

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        name, _ = self.metric
        pts = sorted((r, p) for r in self.evals if (p := self.curve_point(r)) is not None)
        if not pts:
            return
        cum = {0: 0}
        for r in self.rounds:
            cum[r["round"]] = r["cum_uplink_bytes"] + r["cum_downlink_bytes"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax1.set_xlabel("round")
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.plot([cum.get(p[0], math.nan) / 1e3 for p in pts], [p[1] for p in pts], marker="o")
        ax2.set_xlabel("cumulative bytes, up + down (kB)")
        for ax in (ax1, ax2):
            ax.set_ylabel(f"mean held-out {name} of {self._curve_label()}")
            ax.grid(alpha=0.3)
            ax.ticklabel_format(axis="y", useOffset=False)
        fig.suptitle(
            f"{self.cfg.name}: {self.cfg.model.name} on {self.cfg.data.task}, downlink {self.cfg.federation.downlink}"
        )
        fig.tight_layout()
        fig.savefig(self.dir / "metric.png", dpi=120)
        plt.close(fig)

    def _curve_label(self) -> str:
        return "all clients" if self.curve_partitions is None else f"{len(self.curve_partitions)} fixed clients"


def _sha(b: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(b.detach().numpy().tobytes()).hexdigest()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
