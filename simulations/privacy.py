"""Accuracy against privacy: DP-ZO (``privacy.mode=local``) on tweets, the global model at each epsilon, three seeds.

    python simulations/privacy.py                                  # SmolLM2, epsilon 1 4 8 inf, seeds 0 1 2
    python simulations/privacy.py --epsilons 4 inf --seeds 0
    python simulations/privacy.py --quick                          # tiny model, one seed, about a minute (the test)

The setting is ``simulations/personalization.py``'s ``tweets-1.0`` federation (Dirichlet alpha 1.0, 20 clients,
10 per round) with only the global model evaluated. Each (epsilon, seed) is one ``python -m fedprge.simulate`` run
in its own process (run folders under ``--out``, finished runs reused); epsilon ``inf`` is ``privacy.mode=off``,
the non-private reference. delta = 1/N, N the training examples of all clients of the seed's partition, counted by
loading that data before the run. sigma is calibrated to the target epsilon by the run (``privacy.epsilon``).

Per run: the global model's mean / median / worst-10% held-out metric over the trained clients, the untuned
model's mean, sigma and the spent epsilon (``summary.json``'s ``privacy`` block); per epsilon mean +- std over
seeds. Writes ``privacy.csv`` / ``.md`` / ``.json`` and ``privacy.png`` into ``--out``.

Clip C (``--clip``, default 1, ``privacy.clip``'s default). On tweets a step's raw projected gradients have
rms 10-30 (README "Stable steps"), so the step rule (``zo.clip=2``) always binds and leaves each step's q
scalars at RMS 2 (L2 2 sqrt(q)); local mode then clips them to L2 C/sqrt(T) (T local steps), which binds for any C
below 2 sqrt(q T) = 12.6 (q T = 40: q = 4, T = 10 when the README's table was measured; q = 2, T = 20 today).
Once the clip binds, signal per scalar is C/sqrt(q T) against noise sigma C: the
signal-to-noise ratio does not depend on C, and C only scales the noisy step, whose RMS is about sigma C. With
sigma 3.7 / 1.3 / 0.84 at epsilon 1 / 4 / 8 (5 rounds, rate 0.5, delta 1/1280), C = 1 keeps that step at RMS
0.8-3.7, the scale of the step rule's 2 that lr 3e-2 is known to survive. C = 12.6 (no clipping beyond the step
rule) would give noisy steps of RMS 10-46, the unclipped tweet steps that blew up held-out losses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import SMOKE, SMOLLM2, TWEETS, finished, launch, read_run  # noqa: E402 - the sibling study script

SETTING = [*TWEETS, "data.alpha=1.0", "eval.personalization=[global]", "eval.every=0", "eval.timeout_s=3600"]
QUICK = ["federation.clients=4", "federation.rounds=2"]  # on SMOKE: the tiny model, 3 local steps
STATS = ["mean", "median", "worst10", "untuned_mean", "sigma", "epsilon_spent"]


def label(epsilon: float) -> str:
    """How an epsilon is named in folders and tables: 1, 4, 8, inf."""
    return f"{epsilon:g}"


def base_args(seed: int, quick: bool) -> tuple[list[str], list[str]]:
    """(config files, overrides) of the run without privacy: they fix the data it trains on."""
    if quick:
        return [SMOKE], [*SETTING, *QUICK, f"seed={seed}"]
    return [], [*SMOLLM2, *SETTING, f"seed={seed}"]


def delta_of(files: list[str], overrides: list[str]) -> float:
    """1/N, N the training examples of all clients the run will load; exits when not < 1/federation.clients."""
    from fedprge.config import load_config
    from fedprge.task import load_data

    cfg = load_config(files, overrides)
    n = sum(len(c.train) for c in load_data(cfg).clients)
    if not 1 / n < 1 / cfg.federation.clients:
        raise SystemExit(f"delta=1/{n} (training examples) is not below 1/federation.clients={cfg.federation.clients}")
    return 1 / n


def privacy_args(epsilon: float, clip: float, delta: float) -> list[str]:
    """The privacy overrides of one run: local DP-ZO calibrated to ``epsilon``, or off for inf."""
    if math.isinf(epsilon):
        return ["privacy.mode='off'"]  # quoted: YAML reads a bare off as False
    return ["privacy.mode=local", f"privacy.epsilon={epsilon!r}", f"privacy.clip={clip!r}", f"privacy.delta={delta!r}"]


def run(epsilon: float, seed: int, out: Path, quick: bool, clip: float) -> Path:
    """One federation in its own process; returns its run folder (reused when it already finished)."""
    name = f"eps{label(epsilon)}" + ("" if math.isinf(epsilon) else f"-clip{clip:g}")
    folder = out / f"{name}-seed{seed}"
    if done := finished(folder):
        return done
    files, overrides = base_args(seed, quick)
    args = [*(f"--config={f}" for f in files), *overrides, *privacy_args(epsilon, clip, delta_of(files, overrides))]
    return launch(folder, [*args, f"name={name}"], f"{name} seed {seed}")


def run_row(epsilon: float, seed: int, folder: Path) -> dict:
    """One run's statistics of the global model over the clients that trained."""
    from fedprge.results import client_stats

    summary, rows, unseen = read_run(folder)
    metric, higher = summary["metric"], summary["higher_is_better"]
    trained = [r for r in rows if int(r["partition"]) not in unseen]
    p = summary.get("privacy", {"mode": "off", "noise_multiplier": 0.0, "epsilon": math.inf, "delta": None})
    return {
        "epsilon": label(epsilon),
        "seed": seed,
        "metric": metric,
        "mode": p["mode"],
        **client_stats([r[f"global_{metric}"] for r in trained], higher),
        "untuned_mean": float(np.mean([r[f"untuned_{metric}"] for r in trained])),
        "sigma": p["noise_multiplier"],
        "epsilon_spent": p["epsilon"],
        "delta": p["delta"],
        "clients": len(trained),
        "run": str(folder),
    }


def table(runs: list[dict]) -> list[dict]:
    """Per epsilon: mean and std (ddof=1; 0 with one seed) over seeds of every statistic."""
    out = []
    for eps in dict.fromkeys(r["epsilon"] for r in runs):
        seeds = [r for r in runs if r["epsilon"] == eps]
        row = {k: seeds[0][k] for k in ("epsilon", "metric", "mode")} | {"seeds": len(seeds)}
        for key in STATS:
            v = np.array([s[key] for s in seeds], dtype=np.float64)
            spread = len(v) > 1 and np.isfinite(v).all()  # epsilon_spent is inf without DP
            row[key], row[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if spread else 0.0
        row["delta"] = float(np.mean([s["delta"] for s in seeds])) if seeds[0]["delta"] else None
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    head = "| epsilon | mode | seeds | " + " | ".join(STATS) + " |\n|" + "---|" * (3 + len(STATS)) + "\n"
    lines = []
    for r in rows:
        cells = [f"{r[c]:.4f} ± {r[c + '_std']:.4f}" if r["seeds"] > 1 else f"{r[c]:.4f}" for c in STATS]
        lines.append(f"| {r['epsilon']} | {r['mode']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return f"global model, held-out {rows[0]['metric']} over clients\n\n" + head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Mean and worst-10% against epsilon (log scale), error bars = std over seeds; inf at the right end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [float(r["epsilon"]) for r in rows if r["mode"] != "off"]
    inf_x = max(finite, default=1.0) * 3
    xs = [inf_x if r["mode"] == "off" else float(r["epsilon"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name in (("mean", "mean over clients"), ("worst10", "worst 10% of clients")):
        ys, err = [r[key] for r in rows], [r[f"{key}_std"] for r in rows]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linestyle="none", label=name)
    ax.axhline(np.mean([r["untuned_mean"] for r in rows]), color="grey", lw=1, ls="--", label="untuned (mean)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [r["epsilon"] if r["mode"] != "off" else "∞\n(no DP)" for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (user level, delta = 1/N examples)")
    ax.set_ylabel(f"global model: held-out {rows[0]['metric']}")
    ax.set_title("DP-ZO (local) on tweets, ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def json_safe(row: dict) -> dict:
    """``row`` with non-finite floats as None (strict JSON has neither inf nor nan)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def write(rows: list[dict], runs: list[dict], out: Path) -> str:
    """privacy.csv / .md / .json (the table; the JSON also has every run) and privacy.png; returns the markdown."""
    from fedprge.results import write_csv

    write_csv(out / "privacy.csv", rows)
    tables = {"table": [json_safe(r) for r in rows], "runs": [json_safe(r) for r in runs]}
    (out / "privacy.json").write_text(json.dumps(tables, indent=2, allow_nan=False))
    md = markdown(rows)
    (out / "privacy.md").write_text(md)
    plot(rows, out / "privacy.png")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0, math.inf], help="inf: no DP")
    p.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--clip", type=float, default=1.0, help="privacy.clip C, the round vector's L2 bound")
    p.add_argument("--out", type=Path, default=Path("results/privacy"))
    p.add_argument("--quick", action="store_true", help="the tiny model on a 4-client smoke setup (for tests)")
    a = p.parse_args(argv)
    seeds = a.seeds or ([0] if a.quick else [0, 1, 2])
    a.out.mkdir(parents=True, exist_ok=True)
    epsilons = sorted(set(a.epsilons))
    runs = [run_row(e, s, run(e, s, a.out, a.quick, a.clip)) for e in epsilons for s in seeds]
    rows = table(runs)
    print(write(rows, runs, a.out))
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
