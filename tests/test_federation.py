"""Real Flower simulations (Ray backend, no mocks) with the tiny model: a handful of clients, seconds each."""

import csv
import math

import pytest

from fedprge.config import load_config
from fedprge.results import RunWriter
from fedprge.simulate import simulate

SMOKE = "configs/smoke.yaml"


def run(tmp_path, name, *overrides):
    cfg = load_config([SMOKE], [f"name={name}", *overrides])
    writer = RunWriter(cfg, out=tmp_path / name, progress=False)
    summary = simulate(cfg, writer)
    with open(writer.dir / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    return summary, rounds


@pytest.mark.parametrize("downlink", ["weights", "seeds", "pool"])
def test_server_reconstructs_every_client_exactly(tmp_path, downlink):
    summary, rounds = run(
        tmp_path, downlink, f"federation.downlink={downlink}", "federation.verify=true", "federation.pool_size=64"
    )
    assert len(rounds) == 3 and all(int(r["ok"]) == int(r["sampled"]) == 2 for r in rounds)
    errors = [float(r["reconstruction_error"]) for r in rounds]
    assert all(not math.isnan(e) and e <= 1e-6 for e in errors), errors
    assert summary["b_norm"] > 0  # training moved B


def test_same_config_same_numbers_and_two_runs_in_one_process_see_all_clients(tmp_path):
    a, ra = run(tmp_path, "a", "federation.clients=5", "federation.fraction=1.0", "federation.rounds=2")
    b, rb = run(tmp_path, "b", "federation.clients=5", "federation.fraction=1.0", "federation.rounds=2")
    assert [int(r["ok"]) for r in ra] == [int(r["ok"]) for r in rb] == [5, 5]
    assert a["clients_evaluated"] == b["clients_evaluated"] == 5
    assert a["b_sha256"] == b["b_sha256"]
    assert a["methods"] == b["methods"]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_weights_and_seeds_downlinks_train_the_same_global_B(tmp_path):
    w, _ = run(tmp_path, "w", "federation.downlink=weights")
    s, _ = run(tmp_path, "s", "federation.downlink=seeds")
    assert w["b_sha256"] == s["b_sha256"]
    assert s["downlink_bytes_per_client_round"] < w["downlink_bytes_per_client_round"]


def test_uplink_is_only_scalars(tmp_path):
    """q=4 and 10 local steps: 40 float32 scalars plus Flower's message envelope stay under 2 KB."""
    s, rounds = run(tmp_path, "bytes", "federation.local_steps=10", "zo.q=4", "federation.rounds=1")
    per_client = float(rounds[0]["uplink_bytes_per_client"])
    assert 160 < per_client < 2000
    assert s["uplink_bytes_per_client_round"] * 10 < s["adapter_bytes_fp32"]


def test_server_fails_loudly_when_nodes_never_come(tmp_path, monkeypatch):
    cfg = load_config([SMOKE], ["federation.timeout_s=3"])
    from flwr.simulation import run_simulation as flwr_run

    def fewer_nodes(**kw):
        kw["num_supernodes"] = 2  # the config expects 4
        return flwr_run(**kw)

    monkeypatch.setattr("flwr.simulation.run_simulation", fewer_nodes)
    with pytest.raises(RuntimeError, match="only 2 of 4 nodes connected within 3 s"):
        simulate(cfg, RunWriter(cfg, out=tmp_path / "missing", progress=False))


def test_attaches_to_an_existing_ray_cluster(tmp_path):
    """--ray-address: the simulation runs on a Ray head started separately (as on a cluster)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    head += ["--include-dashboard=false", "--disable-usage-stats"]
    # --block keeps this head in the foreground, so it is stopped with the test even if the test fails
    proc = subprocess.Popen(head, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        summary, rounds = run(tmp_path, "cluster", f"sim.ray_address=127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        # a terminated head can leave its raylet behind, and later ray.init() calls would attach to it; this
        # stops every Ray process on the machine (fine in CI, where nothing else runs Ray)
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
    assert [int(r["ok"]) for r in rounds] == [2, 2, 2]
    assert summary["clients_evaluated"] == 4


@pytest.mark.parametrize(("task", "partition"), [("tweets", "dirichlet"), ("shakespeare", "iid")])
def test_other_tasks_and_partitions_run_end_to_end(tmp_path, task, partition):
    summary, rounds = run(tmp_path, f"{task}-{partition}", f"data.task={task}", f"data.partition={partition}")
    assert summary["metric"] == ("acc" if task == "tweets" else "loss")
    assert summary["clients_evaluated"] == 4 and len(rounds) == 3
    assert all(0 <= s["mean"] <= (1 if task == "tweets" else 20) for s in summary["methods"].values())
