"""The run folder: resolved config, per-round and per-client metrics (CSV/JSON), summary, plot, terminal table."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console

from fedprge import privacy
from fedprge.config import RunConfig, to_yaml
from fedprge.federation.sampling import unseen_clients
from fedprge.report import plot_metric, print_summary

if TYPE_CHECKING:
    from fedprge.federation.traffic import Traffic

log = logging.getLogger("fedprge.results")


def client_stats(values: list[float], higher_is_better: bool) -> dict[str, float]:
    """Mean, median and the mean of the worst 10% of clients (at least one client)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if not higher_is_better:
        v = v[::-1]
    k = max(1, math.ceil(0.1 * len(v)))
    return {"mean": float(v.mean()), "median": float(np.median(v)), "worst10": float(v[:k].mean())}


def round_row(
    rnd: int,
    sampled: int,
    ok: int,
    up: int,
    down: int,
    seconds: float,
    *,
    failed: int = 0,
    late: int = 0,
    rejected: int = 0,
    clipped: int = 0,
    skipped: bool = False,
    down_seeds: int = 0,
    down_weights: int = 0,
    replay_directions: int = 0,
    train_loss: float = math.nan,
    reconstruction_error: float = math.nan,
    range_clipped: float = 0.0,
) -> dict[str, Any]:
    """One ``rounds.csv`` row, the same columns for every method (P-RGE and the FedAvg baselines).

    ``up`` / ``down``: the round's training bytes as :class:`~fedprge.federation.traffic.Traffic` counted them;
    ``sampled``: train messages sent, ``ok``: replies accepted. A count a method has no use for stays 0 and a
    number it does not measure stays NaN (FedAvg replays nothing: ``reconstruction_error``). ``replay_directions``:
    the directions the round's train messages (seed catch-ups) make its clients regenerate (a device's cost
    beside its forwards). ``range_clipped`` (``privacy.secagg`` only): the example-weighted share of uplinked
    values clients clipped to the range."""
    return {
        "round": rnd,
        "sampled": sampled,
        "ok": ok,
        "failed": failed,
        "late": late,
        "rejected": rejected,
        "clipped": clipped,
        "skipped": skipped,
        "down_seeds": down_seeds,
        "down_weights": down_weights,
        "replay_directions": replay_directions,
        "train_loss": train_loss,
        "uplink_bytes": up,
        "downlink_bytes": down,
        "uplink_bytes_per_client": up / max(ok, 1),
        "downlink_bytes_per_client": down / max(sampled, 1),
        "reconstruction_error": reconstruction_error,
        "range_clipped": range_clipped,
        "seconds": seconds,
    }


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
        self.missing: dict[int, list[dict[str, Any]]] = {}  # per evaluated round: {partition, reason} not evaluated
        self.summary: dict[str, Any] = {}
        self.curve_partitions: set[int] | None = None  # the clients the per-round curve averages (None: all)

    @property
    def metric(self) -> tuple[str, bool]:
        """The headline per-client metric and whether higher is better."""
        return ("acc", True) if self.cfg.data.task == "tweets" or self._has_acc() else ("loss", False)

    def _has_acc(self) -> bool:
        return any("global_acc" in r for rows in self.evals.values() for r in rows)

    def evaluation(self, rnd: int, rows: list[dict[str, float]], missing: Sequence[dict[str, Any]] = ()) -> None:
        """Record round ``rnd``'s evaluation: its rows and the clients it meant to but could not evaluate."""
        self.evals[rnd] = rows
        self.missing[rnd] = list(missing)

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
        write_csv(self.dir / "rounds.csv", self.rounds)

    def finish(
        self,
        b: torch.Tensor,
        traffic: Traffic,
        before: list[dict],
        after: list[dict],
        seconds: float,
        num_params: int,
        missing: Sequence[dict[str, Any]] = (),
        missing_before: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Write the run's results. ``before`` / ``after``: the untuned (round-0) and final rows; ``missing`` /
        ``missing_before``: the clients those evaluations meant to but could not evaluate ({partition, reason})."""
        name, higher = self.metric
        untuned = {int(r["partition"]): r for r in before if f"global_{name}" in r}  # the round-0 rows
        why_before = {int(m["partition"]): str(m["reason"]) for m in missing_before}
        per_client, no_untuned = [], []
        for r in after:
            part = int(r["partition"])
            row = {"partition": part, f"untuned_{name}": math.nan}
            row.update({f"untuned_{k[7:]}": v for k, v in untuned.get(part, {}).items() if k.startswith("global_")})
            row.update({k: v for k, v in r.items() if k != "partition"})
            per_client.append(row)
            if not _finite(row[f"untuned_{name}"]):
                no_untuned.append({"partition": part, "reason": why_before.get(part, "no untuned (round-0) row")})
        write_csv(self.dir / "clients.csv", per_client)
        methods = self._method_stats(per_client)
        newcomers = set(unseen_clients(self.cfg, self.cfg.federation.clients))  # eval.unseen_fraction
        g, u = f"global_{name}", f"untuned_{name}"
        both = [r for r in per_client if _finite(r.get(g)) and _finite(r[u])]  # a NaN compares as neither
        better = sum((r[g] > r[u]) == higher and r[g] != r[u] for r in both)
        expected = sorted({int(r["partition"]) for r in after} | {int(m["partition"]) for m in missing})
        ok_rounds = [r for r in self.rounds if r["ok"]]
        self.summary = {
            "metric": name,
            "higher_is_better": higher,
            "methods": methods,
            "unseen_clients": sorted(newcomers),  # never trained; their methods apart below (and in the table)
            "methods_trained": self._method_stats([r for r in per_client if r["partition"] not in newcomers]),
            "methods_unseen": self._method_stats([r for r in per_client if r["partition"] in newcomers]),
            "clients_expected": len(expected),
            "clients_evaluated": len(after),
            "missing": [{"partition": int(m["partition"]), "reason": str(m["reason"])} for m in missing],
            "untuned_evaluation": {
                "clients_expected": len(before) + len(missing_before),
                "clients_evaluated": len(before),
                "missing": [{"partition": int(m["partition"]), "reason": str(m["reason"])} for m in missing_before],
            },
            "missing_untuned": no_untuned,
            "clients_improved_by_global": better,
            "clients_compared": len(both),  # clients with both an untuned and a global metric
            # mean validation loss of the global B (the final evaluation's global_val_loss): what studies tune on
            "global_val_loss": _mean_finite([r.get("global_val_loss") for r in per_client]),
            "curve_partitions": None if self.curve_partitions is None else sorted(self.curve_partitions),
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
        if self.cfg.privacy.mode != "off":
            self.summary["privacy"] = privacy.report(self.cfg)
        if self.cfg.privacy.secagg:
            from fedprge.federation import secagg

            self.summary["secagg"] = secagg.report(self.cfg)
        torch.save(b, self.dir / "global_b.pt")
        (self.dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        (self.dir / "rounds.json").write_text(json.dumps(self.rounds, indent=2))
        self.plot()
        self.print_summary()
        return self.summary

    def _method_stats(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Per personalization method: stats of the headline metric over the clients that have it."""
        name, higher = self.metric
        out = {}
        for m in ["untuned", *self.cfg.eval.personalization]:
            vals = [r[f"{m}_{name}"] for r in rows if _finite(r.get(f"{m}_{name}"))]  # only clients with this number
            if vals:
                out[m] = {**client_stats(vals, higher), "clients": len(vals)}
        return out

    def print_summary(self) -> None:
        print_summary(self.console, self.summary, self.dir)

    def plot(self) -> None:
        name, _ = self.metric
        pts = sorted((r, p) for r in self.evals if (p := self.curve_point(r)) is not None)
        if not pts:  # no curve evaluation (eval.every=0 and no rounds)
            return
        cum = {0: 0} | {r["round"]: r["cum_uplink_bytes"] + r["cum_downlink_bytes"] for r in self.rounds}
        cfg = self.cfg
        title = f"{cfg.name}: {cfg.model.name} on {cfg.data.task}, downlink {cfg.federation.downlink}"
        plot_metric(self.dir / "metric.png", pts, cum, f"mean held-out {name} of {self._curve_label()}", title)

    def _curve_label(self) -> str:
        return "all clients" if self.curve_partitions is None else f"{len(self.curve_partitions)} fixed clients"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean_finite(values: list[Any]) -> float:
    """Mean of the finite numbers in ``values`` (NaN when there are none)."""
    vals = [v for v in values if _finite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _sha(b: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(b.detach().numpy().tobytes()).hexdigest()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file, the columns in order of first appearance."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def write_rows(stem: Path, rows: list[dict[str, Any]]) -> None:
    """A study's or benchmark's result rows as ``stem.json`` and ``stem.csv``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    write_csv(stem.with_suffix(".csv"), rows)
