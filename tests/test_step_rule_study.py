"""simulations/step_rule.py on the tiny model: every (seed, client, rule) row, and the table over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))
import step_rule  # noqa: E402 - a study script, not a package


def test_step_rule_study_tables_each_seed_and_pairs_the_rules_per_seed(tmp_path):
    out = tmp_path / "sr"
    args = ["--model", "tiny", "--steps", "2", "--clients", "0", "1", "--seeds", "0", "3", "--clips", "0", "1e-3"]
    assert step_rule.main([*args, "--out", str(out)]) == 0
    rows = json.loads((out / "step_rule.json").read_text())
    assert [(r["seed"], r["client"]) for r in rows] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    # a tiny clip shrinks every step to RMS 1e-3, so B stays far smaller than without the rule
    assert all(r["clip=0.001"]["b_norm"] < r["clip=0"]["b_norm"] for r in rows)
    summary = json.loads((out / "step_rule_seeds.json").read_text())
    per_seed = {
        s: np.mean([r["clip=0.001"]["loss"] for r in rows if r["seed"] == s])
        - np.mean([r["clip=0"]["loss"] for r in rows if r["seed"] == s])
        for s in (0, 3)
    }
    assert summary["clip=0.001"]["d_loss"] == pytest.approx(np.mean(list(per_seed.values())))
    assert summary["clip=0.001"]["d_loss_std"] == pytest.approx(np.std(list(per_seed.values()), ddof=1))
    assert summary["clip=0"]["d_loss"] == 0.0
