"""simulations/equal_compute.py --quick: the equal-compute study end to end on the tiny model (4 real runs, ~3 min)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from fedprge.config import load_config

BUDGET, ROUNDS, QS = 8, 2, (2, 4)  # --quick: local_steps * q = 8, 2 rounds; grid lr {0.03, 0.1} x eps {0.01}


@pytest.mark.slow
def test_equal_compute_tunes_on_validation_and_tables_every_q(tmp_path):
    cmd = [sys.executable, "simulations/equal_compute.py", "--quick", "--settings", "tweets", "--out", str(tmp_path)]
    subprocess.run([*cmd, "--qs", *map(str, QS)], check=True, timeout=900)
    result = json.loads((tmp_path / "equal_compute.json").read_text())
    rows = {r["q"]: r for r in result["rows"]}
    assert sorted(rows) == list(QS)
    for q in QS:
        runs = sorted((tmp_path / "tweets").glob(f"q{q}-*-seed0/*/summary.json"))
        assert len(runs) == 2  # the grid, on the tuning seed
        val = {}
        for s in runs:
            cfg = load_config([s.parent / "config.yaml"])
            assert cfg.federation.local_steps * cfg.zo.q == BUDGET and cfg.zo.q == q
            assert cfg.eval.personalization == ["global"] and cfg.eval.every == 1
            with open(s.parent / "clients.csv") as f:  # the choice, recomputed from the validation column
                losses = [float(r["global_val_loss"]) for r in csv.DictReader(f)]
            val[cfg.zo.lr, cfg.zo.eps] = sum(losses) / len(losses)
            assert json.loads(s.read_text())["global_val_loss"] == pytest.approx(val[cfg.zo.lr, cfg.zo.eps])
        r = rows[q]
        assert (r["lr"], r["eps"]) == min(val, key=val.get)
        assert r["val_loss"] == pytest.approx(min(val.values()))
        assert r["metric"] == "acc" and r["seeds"] == 1 and r["rounds"] == ROUNDS
        assert all(math.isfinite(r[k]) for k in ("final", "untuned", "seconds_per_round", "uplink_B_per_client_round"))
        assert (
            r["forward_calls_per_client_round"] == BUDGET // q and r["forward_calls_per_client"] == ROUNDS * BUDGET // q
        )
        assert r["replica_forwards_per_client_round"] == 2 * BUDGET
        assert r["row_forwards_per_client_round"] == 2 * BUDGET * cfg.federation.batch_size
        assert r["replica_forwards_per_client"] == 2 * BUDGET * ROUNDS
    curves = {c["q"]: c for c in result["curves"]}
    assert all(c["replica_forwards"] == [0, 2 * BUDGET, 4 * BUDGET] and len(c["metric"]) == 3 for c in curves.values())
    won = result["winners"]["tweets"]
    best = max(r["final"] for r in rows.values())  # accuracy: higher is better
    assert won["per_forward"] == [q for q in QS if rows[q]["final"] == best]
    md = (tmp_path / "equal_compute.md").read_text()
    assert md.count("| tweets (acc) |") == len(QS) and "Winners: tweets: q = " in md
    assert (tmp_path / "equal_compute.png").stat().st_size > 10_000
