"""Chaos on the real loopback fleet (``clients/fleet.py``): a SuperNode and then the SuperLink are SIGKILLed.

Real processes (``flower-superlink``, ``flower-supernode``, ``flwr run``), eager clients on the tiny model, plain
HTTP on 127.0.0.1; no mocks. Slow: the SuperLink declares a killed SuperNode offline only after its heartbeats
stop (up to a minute), and every message starts a ClientApp process.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedprge.config import load_config
from fedprge.federation import checkpoint
from fedprge.federation.faults import fault_for
from fedprge.federation.sampling import sample_round
from fedprge.results import RunWriter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from clients import fleet as fl  # noqa: E402

SMOKE = str(REPO / "configs" / "smoke.yaml")
# 4 clients, 2 per round, 4 rounds. The run seed and drop rate inject one fault the test builds on: client 2 drops
# out of round 2 (and client 1 of round 4); the SuperNode of client 2 is killed as round 2 reaches it, so the
# server loses the same reply a simulation of this config loses, and both must end with the same B.
CHAOS = [
    "federation.clients=4",
    "federation.fraction=0.5",
    "federation.rounds=4",
    "eval.every=0",
    "eval.personalization=[global]",
    "seed=4",
    "faults.drop_rate=0.1",
    "federation.timeout_s=150",  # beyond the <= 60 s the SuperLink takes to declare a killed node offline
]
KILLED, KILL_ROUND, CRASH_AFTER = 2, 2, 3


def start(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """``python clients/fleet.py ARGS`` in the background; its output goes to ``tmp/name.out``."""
    log = tmp / f"{name}.out"
    cmd = [sys.executable, "clients/fleet.py", "--insecure", "--work", str(tmp / name), *args]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finish(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait for a fleet.py; on timeout stop it (Ctrl-C stops its processes) and fail."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        pytest.fail(f"clients/fleet.py did not finish within {timeout_s:.0f} s")


def kill_group(pid: int) -> None:
    """SIGKILL a process group started by fleet.py and every descendant that left it."""
    import psutil

    with contextlib.suppress(psutil.Error):
        children = psutil.Process(pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.kill()


def saved_round(run: Path) -> int:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(checkpoint.load(run / checkpoint.NAME)["round"])
    return 0


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "rounds.csv").open() as f:
        return list(csv.DictReader(f))


def test_fleet_resume_refuses_a_folder_it_cannot_continue(tmp_path):
    from fedprge.config import to_yaml

    run = tmp_path / "smoke-1"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config([SMOKE])))
    cases = [
        ([], "nothing to resume"),
        (["--out", str(tmp_path)], "--out does not go with --resume"),
        (["zo.lr=0.2"], "zo.lr: 0.05 -> 0.2"),
    ]
    for i, (args, msg) in enumerate(cases):
        if i == 2:
            checkpoint.save(run / checkpoint.NAME, {"config": (run / "config.yaml").read_text()})
        cmd = [sys.executable, "clients/fleet.py", "--insecure", "--work", str(tmp_path / "w"), "--resume", str(run)]
        out = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and msg in out.stderr, out.stderr


@pytest.mark.slow
def test_fleet_survives_a_killed_supernode_and_a_killed_superlink(tmp_path):
    """Phase 1: SuperNode 2 is SIGKILLed as round 2's train message reaches it and started again at once; the
    server counts client 2 failed in round 2 (the SuperLink's "node unavailable" reply), registers the restarted
    node under its new id before round 3, and client 2 trains in round 3. After round 3's checkpoint the SuperLink
    is SIGKILLed with its ServerApp; fleet.py stops and says how to resume. Phase 2: ``fleet.py --resume`` on a new
    SuperLink and new SuperNodes runs round 4 and the final evaluation. rounds.csv holds rounds 1-4 once each, rounds
    1-3 exactly as written before the crash, and the final B equals, bit for bit, a Ray simulation of the same
    config that loses the same reply (client 2's injected drop in round 2)."""
    cfg = load_config([SMOKE], CHAOS)
    plan = {r: sample_round(cfg, 4, r) for r in range(1, 5)}
    assert plan == {1: [1, 3], 2: [0, 2], 3: [0, 2], 4: [1, 3]}
    assert [(r, p) for r, ps in plan.items() for p in ps if fault_for(cfg, r, p).drop] == [(KILL_ROUND, KILLED), (4, 1)]

    t0 = time.monotonic()
    port = fl.free_port()
    args = ["--port", str(port), "--out", str(tmp_path / "runs"), "--config", SMOKE, *CHAOS]
    proc, log = start(tmp_path, "fleet", *args)
    work, restarted = tmp_path / "fleet", fl.Fleet(tmp_path / "restarted", None, port=port)
    run, before_crash = None, None
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and before_crash is None:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            node_log = work / "logs" / f"supernode-{KILLED}.log"
            if not restarted.procs and node_log.exists():
                text = node_log.read_text(errors="replace")
                if re.search(rf"ROUND {KILL_ROUND}\][^\n]*\n[^\n]*Receiving: train message", text):
                    kill_group(int((work / f"supernode-{KILLED}.pid").read_text()))
                    restarted.start_supernode(KILLED, 4)  # the same partition, a new node id
            run = run or next((d for d in (tmp_path / "runs").glob("smoke-*")), None)
            if run is not None and saved_round(run) >= CRASH_AFTER:
                kill_group(int((work / "superlink.pid").read_text()))
                before_crash = (saved_round(run), (run / "rounds.csv").read_text().splitlines())
            time.sleep(0.2)
        code = finish(proc, 120)
    finally:
        restarted.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
    out = log.read_text()
    phase1 = time.monotonic() - t0
    assert restarted.procs and before_crash is not None, out[-4000:]
    assert code == 1 and "the SuperLink exited during the run: superlink (killed by signal 9)" in out, out[-4000:]
    assert f"continue with: python clients/fleet.py --insecure --resume {run}" in out
    assert f"round {KILL_ROUND}: client {KILLED} failed: Error: Node Unavailable" in out, out[-4000:]
    assert re.search(rf"node \d+ registered as client {KILLED} between rounds \(replaces node \d+", out), out[-4000:]
    saved, lines = before_crash
    assert saved == CRASH_AFTER and not (run / "summary.json").exists()

    t1 = time.monotonic()
    proc, log = start(tmp_path, "resume", "--resume", str(run))
    code = finish(proc, 600)
    out = log.read_text()
    phase2 = time.monotonic() - t1
    assert code == 0 and f"fleet: results in {run}" in out, out[-4000:]

    after = (run / "rounds.csv").read_text().splitlines()
    assert after[: CRASH_AFTER + 1] == lines[: CRASH_AFTER + 1]  # the header and rounds 1-3, not lost or rewritten
    got = [(r["round"], r["sampled"], r["ok"], r["failed"], r["late"], r["rejected"]) for r in rows(run)]
    assert got == [
        ("1", "2", "2", "0", "0", "0"),
        ("2", "2", "1", "1", "0", "0"),  # client 2 killed
        ("3", "2", "2", "0", "0", "0"),  # client 2 back, on its restarted SuperNode
        ("4", "2", "1", "1", "0", "0"),  # client 1's injected drop, after the resume
    ]
    fleet_b = torch.load(run / "global_b.pt")
    from fedprge.simulate import simulate

    writer = RunWriter(cfg, out=tmp_path / "sim", progress=False)
    simulate(cfg, writer)
    sim_b = torch.load(writer.dir / "global_b.pt")
    assert fleet_b.abs().max() > 1e-3  # training moved B
    assert torch.equal(fleet_b, sim_b)
    print(f"chaos fleet: phase 1 (to the SuperLink kill) {phase1:.0f} s, resume {phase2:.0f} s")
