"""Equal-compute study: the held-out metric against forward passes and against wall seconds, for q in {1, 2, 4, 8}.

    python simulations/equal_compute.py                        # SmolLM2: Shakespeare (loss) and tweets (accuracy)
    python simulations/equal_compute.py --settings tweets --qs 2 4
    python simulations/equal_compute.py --settings shakespeare-small tweets-small   # 10 clients, 5 a round, 3 rounds
    python simulations/equal_compute.py --settings shakespeare-small+round --qs 1   # a step-rule candidate
    python simulations/equal_compute.py --quick                # tiny model, one seed, two grid points (the test)

Every q gets the same forward budget per client-round: ``federation.local_steps * zo.q = --budget`` (40: q = 1
takes 40 local steps, q = 8 five). Forwards are counted two ways, training only (evaluation apart):

* a *forward call* is one batched model forward; P-RGE makes one per local step, all 2q perturbed replicas of
  the step's minibatch in it: ``local_steps`` calls per client-round;
* a *replica-forward* is one replica's forward over the minibatch, what a sequential zeroth-order step issues as
  one call: ``2q * local_steps = 2 * budget`` per client-round for every q (times ``batch_size`` sequences:
  *row-forwards*). "Per client" figures are a client's cumulated over the rounds, as if sampled in every round.

Each q's ``zo.lr`` and ``zo.eps`` are chosen on VALIDATION, never test: the ``--grid-lr`` x ``--grid-eps`` grid runs
with the first of ``--seeds``, and the point with the lowest mean validation loss of the final global B over the
clients (``global_val_loss`` of ``summary.json``) is then run with the other seeds. Every (setting, q, lr, eps,
seed) is one ``python -m fedprge.simulate`` run in its own process (run folders under ``--out``, finished ones
reused), personalization off but ``global``, the curve evaluated every round. The table is computed from the run
folders: per setting and q the chosen lr/eps, the final held-out metric of the global B over all clients (mean
+- std over seeds, ddof 1), the forward counts, the training seconds per round (``rounds.csv``) and the uplink
bytes per client-round; the plot, the metric of the ``eval.curve_clients`` clients against cumulative
replica-forwards per client and against cumulative training seconds (one line per q, +- std band). Writes
``equal_compute.csv`` / ``.md`` / ``.json`` / ``.png`` into ``--out``; the last line names the q that wins per
forward and per second on each setting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import SMOKE, TWEETS, launch, read_run  # noqa: E402 - the sibling study script

COMMON = ["eval.personalization=[global]", "eval.every=1", "export.adapters=false"]
SETTINGS = {
    "shakespeare": [],  # the main job as it is (SmolLM2, model.precision=auto, 50 roles, 5 rounds)
    "tweets": [*TWEETS, "data.alpha=1.0"],
}
SMALL = ["federation.clients=10", "federation.fraction=0.5", "federation.rounds=3"]  # compare.py's scale
SETTINGS |= {f"{name}-small": [*args, *SMALL] for name, args in SETTINGS.items()}  # ~2-4 min a run, not ~10
# step-rule candidates, each a setting of its own next to plain P-RGE (the rule zo.clip=2 being the plain one):
# "normalised" binds on every step (rms(g) >= 0.1 on these tasks), so a step is lr * 0.02 * g / rms(g): normalised
# SGD, FZOO's idea with the projected gradients' spread for its losses' (its lr grid must be ~30x larger);
# "round" shares the round's directions between its clients, whose scalars the server averages per direction
RULES = {"normalised": ["zo.clip=0.02"], "round": ["federation.seed_scope=round"]}
SETTINGS |= {f"{name}+{rule}": [*SETTINGS[name], *extra] for name in list(SETTINGS) for rule, extra in RULES.items()}
DEFAULTS = {"seeds": [0, 1, 2], "budget": 40, "grid_lr": [1e-2, 3e-2, 1e-1], "grid_eps": [1e-3, 1e-2]}
QUICK_DEFAULTS = {"seeds": [0], "budget": 8, "grid_lr": [3e-2, 1e-1], "grid_eps": [1e-2]}
QUICK = ["federation.clients=4", "federation.rounds=2", "data.max_test_per_client=4"]  # on SMOKE


def tag(x: float) -> str:
    return f"{x:g}"


def run(setting: str, q: int, lr: float, eps: float, seed: int, a: argparse.Namespace) -> Path:
    """One federation of ``setting`` with ``q`` directions at the forward budget; its run folder."""
    if a.budget % q:
        raise SystemExit(f"--budget {a.budget} is not a multiple of q = {q}")
    name = f"{setting}-q{q}"
    args = [*SETTINGS[setting], *COMMON, f"zo.q={q}", f"federation.local_steps={a.budget // q}"]
    args += [f"zo.lr={lr!r}", f"zo.eps={eps!r}", f"seed={seed}", f"name={name}"]
    if a.quick:
        args = ["--config", SMOKE, *args, *QUICK]
    label = f"{name} lr {tag(lr)} eps {tag(eps)} seed {seed}"
    return launch(a.out / setting / f"q{q}-lr{tag(lr)}-eps{tag(eps)}-seed{seed}", args, label)


@dataclass
class Run:
    """What the table needs of one finished run."""

    folder: Path
    summary: dict
    clients: list[dict[str, float]]
    rounds: list[dict[str, str]]
    q: int
    local_steps: int
    batch_size: int
    lr: float
    eps: float

    @classmethod
    def read(cls, folder: Path) -> Run:
        from fedprge.config import load_config

        summary, clients, _ = read_run(folder)
        with open(folder / "rounds.csv") as f:
            rounds = list(csv.DictReader(f))
        cfg = load_config([folder / "config.yaml"])
        fed = cfg.federation
        return cls(folder, summary, clients, rounds, cfg.zo.q, fed.local_steps, fed.batch_size, cfg.zo.lr, cfg.zo.eps)

    @property
    def val_loss(self) -> float:
        """Mean validation loss of the final global B (inf when it is not finite: a diverged run never wins)."""
        v = self.summary.get("global_val_loss", math.nan)
        return v if math.isfinite(v) else math.inf

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At rounds 0..R: (replica-forwards per client, cumulative training seconds, mean held-out metric of the
        curve clients): round 0 and R from ``clients.csv`` (untuned, final global B), the rest from ``rounds.csv``."""
        name, parts = self.summary["metric"], self.summary.get("curve_partitions")
        mine = [r for r in self.clients if parts is None or int(r["partition"]) in parts]
        mid = [float(r.get(f"curve_global_{name}") or math.nan) for r in self.rounds[:-1]]
        ends = [float(np.mean([r[f"{m}_{name}"] for r in mine])) for m in ("untuned", "global")]
        metric = np.array([ends[0], *mid, ends[1]])
        rnd = np.arange(len(self.rounds) + 1)
        seconds = np.concatenate([[0.0], np.cumsum([float(r["seconds"]) for r in self.rounds])])
        return 2 * self.q * self.local_steps * rnd, seconds, metric


def tune(setting: str, q: int, a: argparse.Namespace) -> tuple[list[dict], Run]:
    """The grid of ``q`` on the tuning seed: (its rows, the run of lowest mean validation loss)."""
    runs = [Run.read(run(setting, q, lr, eps, a.seeds[0], a)) for lr in a.grid_lr for eps in a.grid_eps]
    best = min(runs, key=lambda r: r.val_loss)
    rows = [
        {"setting": setting, "q": q, "lr": r.lr, "eps": r.eps, "seed": a.seeds[0], "val_loss": r.val_loss}
        | {"chosen": r is best, "run": str(r.folder)}
        for r in runs
    ]
    return rows, best


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def table_row(setting: str, runs: list[Run]) -> dict:
    """One (setting, q) row over its seeds' runs (same q, lr, eps)."""
    r0, s0 = runs[0], runs[0].summary
    name, rounds = s0["metric"], len(r0.rounds)
    replica = 2 * r0.q * r0.local_steps
    row = {"setting": setting, "metric": name, "higher_is_better": s0["higher_is_better"], "q": r0.q}
    row |= {"local_steps": r0.local_steps, "lr": r0.lr, "eps": r0.eps, "seeds": len(runs), "val_loss": r0.val_loss}
    row["final"], row["final_std"] = mean_std([r.summary["methods"]["global"]["mean"] for r in runs])
    row["untuned"], _ = mean_std([r.summary["methods"]["untuned"]["mean"] for r in runs])
    row |= {
        "forward_calls_per_client_round": r0.local_steps,
        "replica_forwards_per_client_round": replica,
        "row_forwards_per_client_round": replica * r0.batch_size,
        "forward_calls_per_client": r0.local_steps * rounds,
        "replica_forwards_per_client": replica * rounds,
        "rounds": rounds,
    }
    row["seconds_per_round"], row["seconds_per_round_std"] = mean_std(
        [np.mean([float(x["seconds"]) for x in r.rounds]) for r in runs]
    )
    row["uplink_B_per_client_round"] = float(np.mean([r.summary["uplink_bytes_per_client_round"] for r in runs]))
    parts = s0.get("curve_partitions")
    row["curve_clients"] = len(r0.clients) if parts is None else len(parts)
    row["clients"] = len(r0.clients)
    return row


def curves(runs: list[Run]) -> dict[str, list[float]]:
    """Mean and std over seeds of the metric per round, the forwards and the mean cumulative seconds."""
    per_seed = [r.curve() for r in runs]
    metric = np.array([c[2] for c in per_seed])
    return {
        "replica_forwards": per_seed[0][0].tolist(),
        "seconds": np.mean([c[1] for c in per_seed], axis=0).tolist(),
        "metric": metric.mean(0).tolist(),
        "metric_std": (metric.std(0, ddof=1) if len(runs) > 1 else np.zeros(metric.shape[1])).tolist(),
    }


def winners(rows: list[dict], lines: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Per setting: the q of best final metric (every q ends at the same forwards) and the q of best metric at the
    training seconds every q reached (the shortest q's total, its curve interpolated); ties are all named."""
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        sign = 1 if mine[0]["higher_is_better"] else -1
        final = {r["q"]: r["final"] for r in mine}
        horizon = min(lines[setting, q]["seconds"][-1] for q in final)
        at = {q: float(np.interp(horizon, lines[setting, q]["seconds"], lines[setting, q]["metric"])) for q in final}
        out[setting] = {"metric": mine[0]["metric"], "seconds": horizon, "final": final, "at_seconds": at}
        for key, scores in (("per_forward", final), ("per_second", at)):
            best = max(sign * v for v in scores.values())
            out[setting][key] = [q for q, v in scores.items() if sign * v >= best - 1e-12]
    return out


def markdown(rows: list[dict], grid: list[dict], won: dict[str, dict]) -> str:
    """The study table, the tuning grid and the winners."""
    head = (
        "| setting (metric) | q | local steps | lr | eps | val loss | final held-out metric | untuned "
        "| forward calls / client-round | replica-forwards / client-round | replica-forwards / client "
        "| train s / round | uplink B / client-round |\n|" + "---|" * 13 + "\n"
    )
    lines = []
    for r in rows:
        spread = r["seeds"] > 1
        final = f"{r['final']:.4f} ± {r['final_std']:.4f}" if spread else f"{r['final']:.4f}"
        secs = (
            f"{r['seconds_per_round']:.3g} ± {r['seconds_per_round_std']:.2g}"
            if spread
            else f"{r['seconds_per_round']:.3g}"
        )
        cells = [
            f"{r['setting']} ({r['metric']})",
            r["q"],
            r["local_steps"],
            tag(r["lr"]),
            tag(r["eps"]),
            f"{r['val_loss']:.4f}",
            final,
            f"{r['untuned']:.4f}",
            r["forward_calls_per_client_round"],
            r["replica_forwards_per_client_round"],
            r["replica_forwards_per_client"],
            secs,
            f"{r['uplink_B_per_client_round']:.0f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    caption = "".join(
        f"\n{r['setting']}: final metric = the global B's mean over all {r['clients']} clients, mean ± std over "
        f"{r['seeds']} seed(s) (ddof 1); the curves (plot) average the {r['curve_clients']} eval.curve_clients "
        "clients; val loss = the chosen grid point's mean validation loss (tuning seed).\n"
        for r in {r["setting"]: r for r in rows}.values()
    )
    tuning = "\n| setting | q | lr | eps | val loss | chosen |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {g['setting']} | {g['q']} | {tag(g['lr'])} | {tag(g['eps'])} | {g['val_loss']:.4f} | "
        f"{'**yes**' if g['chosen'] else ''} |"
        for g in grid
    )
    return head + "\n".join(lines) + "\n" + caption + tuning + "\n\n" + verdict(won) + "\n"


def verdict(won: dict[str, dict]) -> str:
    """The line that names the q that wins per forward and per second on each setting."""

    def qs(w: dict, key: str) -> str:
        best = w[key]
        return f"q = {best[0]}" if len(best) == 1 else "q = " + ", ".join(map(str, best)) + " (tied)"

    parts = [
        f"{s}: {qs(w, 'per_forward')} per forward (final {w['metric']} {w['final'][w['per_forward'][0]]:.4f}), "
        f"{qs(w, 'per_second')} per second ({w['metric']} {w['at_seconds'][w['per_second'][0]]:.4f} after "
        f"{w['seconds']:.3g} s of training, the fastest q's total)"
        for s, w in won.items()
    ]
    return "Winners: " + "; ".join(parts) + "."


def plot(rows: list[dict], lines: dict[tuple[str, int], dict], path: Path) -> None:
    """Per setting: the metric against cumulative replica-forwards per client and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for setting, (ax1, ax2) in zip(settings, axes, strict=True):
        mine = [r for r in rows if r["setting"] == setting]
        for i, r in enumerate(mine):
            line = lines[setting, r["q"]]
            y, sd = np.array(line["metric"]), np.array(line["metric_std"])
            for ax, x in ((ax1, line["replica_forwards"]), (ax2, line["seconds"])):
                ax.plot(
                    x,
                    y,
                    marker="o",
                    ms=3,
                    color=f"C{i}",
                    label=f"q = {r['q']} (lr {tag(r['lr'])}, eps {tag(r['eps'])})",
                )
                ax.fill_between(x, y - sd, y + sd, color=f"C{i}", alpha=0.2)
        metric, n = mine[0]["metric"], mine[0]["curve_clients"]
        for ax, xlabel in (
            (ax1, "replica-forwards per client (2q x local steps x rounds)"),
            (ax2, "training wall seconds"),
        ):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"mean held-out {metric}, {n} curve clients")
            ax.set_title(f"{setting}: ± std over {mine[0]['seeds']} seed(s)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from fedprge.results import write_csv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["shakespeare", "tweets"], choices=list(SETTINGS))
    p.add_argument("--qs", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--seeds", nargs="+", type=int, help="the first one also tunes lr and eps (default 0 1 2)")
    p.add_argument("--budget", type=int, help="local_steps * q per client-round (default 40)")
    p.add_argument("--grid-lr", nargs="+", type=float, help="zo.lr candidates (default 1e-2 3e-2 1e-1)")
    p.add_argument("--grid-eps", nargs="+", type=float, help="zo.eps candidates (default 1e-3 1e-2)")
    p.add_argument("--out", type=Path, default=Path("results/equal_compute"))
    p.add_argument("--quick", action="store_true", help="tiny model, 4 clients, 2 rounds, budget 8, seed 0, 2 lr")
    a = p.parse_args(argv)
    for key, value in (QUICK_DEFAULTS if a.quick else DEFAULTS).items():  # what is given explicitly stays
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.out.mkdir(parents=True, exist_ok=True)
    rows, grid, lines = [], [], {}
    for setting in a.settings:
        for q in a.qs:
            tried, best = tune(setting, q, a)
            runs = [best] + [Run.read(run(setting, q, best.lr, best.eps, s, a)) for s in a.seeds[1:]]
            grid += tried
            rows.append(table_row(setting, runs))
            lines[setting, q] = curves(runs)
    won = winners(rows, lines)
    write_csv(a.out / "equal_compute.csv", rows)
    curves_out = [{"setting": s, "q": q, **c} for (s, q), c in lines.items()]
    result = {"rows": rows, "grid": grid, "curves": curves_out, "winners": won}
    (a.out / "equal_compute.json").write_text(json.dumps(result, indent=2))
    md = markdown(rows, grid, won)
    (a.out / "equal_compute.md").write_text(md)
    plot(rows, lines, a.out / "equal_compute.png")
    print(md)
    print(f"results: {a.out}")
    print(verdict(won))
    return 0


if __name__ == "__main__":
    sys.exit(main())
