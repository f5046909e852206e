"""simulations/privacy.py --quick: one DP run and its non-private reference, tabled (tiny model, about a minute)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedprge.config import load_config
from fedprge.task import load_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two Flower simulations started from a subprocess, like the personalization study's test
def test_the_privacy_study_tables_each_epsilon_with_delta_one_over_the_training_examples(tmp_path):
    cmd = [sys.executable, "simulations/privacy.py", "--quick", "--epsilons", "4", "inf", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    (dp,) = (tmp_path / "eps4-clip1-seed0").glob("*/summary.json")
    (off,) = (tmp_path / "epsinf-seed0").glob("*/summary.json")
    p = json.loads(dp.read_text())["privacy"]
    assert p["mode"] == "local" and p["target_epsilon"] == 4 and p["clip"] == 1
    assert 4 - 0.01 <= p["epsilon"] <= 4 + 1e-9  # Opacus's calibration tolerance
    n = sum(len(c.train) for c in load_data(load_config([dp.parent / "config.yaml"])).clients)
    assert p["delta"] == pytest.approx(1 / n, rel=1e-12)
    assert "privacy" not in json.loads(off.read_text())
    assert load_config([off.parent / "config.yaml"]).privacy.mode == "off"
    with open(tmp_path / "privacy.csv") as f:
        rows = {r["epsilon"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"4", "inf"} and all(math.isfinite(float(r["mean"])) for r in rows.values())
    assert rows["inf"]["mode"] == "off" and rows["4"]["mode"] == "local"
    assert float(rows["4"]["sigma"]) == pytest.approx(p["noise_multiplier"])
    assert (tmp_path / "privacy.md").exists() and (tmp_path / "privacy.png").stat().st_size > 10_000
