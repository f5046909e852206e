"""simulations/main_job.py --versus: the previous defaults and today's, each a real run in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_versus_runs_both_defaults_and_tables_their_cost_and_metrics(tmp_path):
    cmd = [sys.executable, "simulations/main_job.py", "--versus", "--config", "configs/smoke.yaml"]
    subprocess.run([*cmd, "federation.clients=4", "--out", str(tmp_path)], check=True, timeout=900)
    runs = json.loads((tmp_path / "versus.json").read_text())
    prev, now = runs["previous"], runs["today"]
    assert (prev["q"], prev["local_steps"]) == (4, 10)  # main_job.PREVIOUS overrides the smoke config's
    assert (now["q"], now["local_steps"]) == (4, 3)  # configs/smoke.yaml's own
    for r in (prev, now):  # every sampled client answered: 2 per round, 3 rounds, 2q replicas per local step
        assert r["train_replica_forwards"] == 3 * 2 * 2 * r["q"] * r["local_steps"]
        assert r["clients_evaluated"] == 4 and r["wall_s"] > r["train_s"] > 0
        assert set(r["means"]) == {"untuned", "global", "finetune", "local", "personal", "prior"}
    assert prev["means"]["untuned"] == now["means"]["untuned"]  # the same clients, model and data
    assert prev["means"]["global"] != now["means"]["global"]
    md = (tmp_path / "versus.md").read_text()
    assert md.count("| previous | 4 | 10 |") == 1 and "today / previous: wall" in md
    assert md.count("\n| prior |") == 2  # each run's main-job table
