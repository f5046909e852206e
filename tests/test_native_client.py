"""The native client (``clients/native``): ``fedprge-client``, C++ on ExecuTorch's runtime, speaking Flower's Fleet API.

The slow tests build it against the executorch wheel with ``clients/native/build.sh`` (which installs its Debian
packages with apt-get when they are missing; ~1.5 min cold, seconds when up to date) and check it against the
Python reference: the direction test vectors, a round of training and every evaluation method bit for bit, the
errors bad input gives, a TLS + SuperNode-auth fleet of two native clients and two Python SuperNodes whose global
B equals the all-Python fleet's, and a native client killed mid-round that catches up from its state file.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_fleet import fleet

from fedprge.config import load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "clients" / "native"
BIN = NATIVE / "build" / "fedprge-client"
SMOKE = str(REPO / "configs" / "smoke.yaml")
FED = ["federation.clients=4", "federation.fraction=1.0", "federation.rounds=2", "eval.every=0"]
sys.path.insert(0, str(REPO))


def config(*overrides: str):
    return load_config([SMOKE], [*FED, *overrides])


def rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def native_bin() -> Path:
    """``fedprge-client`` built against the wheel (the build script installs the toolchain if it can)."""
    pytest.importorskip("executorch")
    res = subprocess.run([str(NATIVE / "build.sh")], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        if "need root or sudo" in res.stderr or "Unable to locate package" in res.stderr:
            pytest.skip(f"the native toolchain cannot be installed here: {res.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"clients/native/build.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return BIN


@pytest.fixture(scope="module")
def pte(tmp_path_factory) -> Path:
    """A portable-kernel .pte that matches :func:`config`."""
    pytest.importorskip("executorch")
    from fedprge.export.backend import export_args

    out = tmp_path_factory.mktemp("pte") / "smoke.pte"
    cmd = [sys.executable, "-m", "fedprge.export", *export_args(config()), "--backend", "portable", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    return out


def native(binary: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The client's error: it exited with code 2 and said why in one line (its last line on stderr)."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("fedprge-client:")]
    assert len(lines) == 1, res.stderr[-2000:]
    return lines[0]


# --- the data file (fast) ---------------------------------------------------------------------------------------
def test_data_file_holds_the_python_clients_examples_and_batches():
    from clients.native.client_data import client_data
    from fedprge.data import encode
    from fedprge.models import load_tokenizer
    from fedprge.task import Task

    cfg = config()
    data = client_data(cfg, 1)
    assert data["format"] == "fedprge-client-data/1" and data["partition"] == 1 and data["config"] == to_yaml(cfg)
    # the data and minibatch logic of a Python client (no backend needed for it)
    task = Task(cfg, backend=SimpleNamespace(num_params=0), tokenizer=load_tokenizer(cfg.model.name))
    c = task.client(1)
    assert [len(data[s]) for s in ("train", "val", "test")] == [len(c.train), len(c.val), len(c.test)]
    for rnd in (1, 2):
        for step in range(cfg.federation.local_steps):
            want = task.train_batch(1, rnd, step)
            picked = [data["train"][i] for i in data["train_batches"][rnd - 1][step]]
            width = max(len(ids) for _, ids in picked)
            for r, (prompt, ids) in enumerate(picked):
                padded = ids + [data["pad_token_id"]] * (width - len(ids))
                assert want["input_ids"][r].tolist() == padded
                labels = [-100] * prompt + ids[prompt:] + [-100] * (width - len(ids))
                assert want["labels"][r].tolist() == labels
    first = encode(task.tokenizer, [c.test[0]], cfg.data.max_len)["input_ids"][0].tolist()
    assert data["test"][0][1] == first
    assert len(data["personal_batches"]["1"]) == cfg.eval.personal_steps


def test_fleet_refuses_native_clients_without_a_program(tmp_path):
    out = subprocess.run(
        [sys.executable, "clients/fleet.py", "--insecure", "--native", "2", "--work", str(tmp_path), "--config", SMOKE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--native needs the clients' .pte" in out.stderr


# --- the binary against the Python reference ---------------------------------------------------------------------
@pytest.mark.slow
def test_native_directions_match_the_test_vectors(native_bin):
    from clients.vectors import vectors

    res = native(native_bin, "vectors")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == vectors()


def train_check(native_bin: Path, pte: Path, data: Path, cfg_yaml: Path, rnd: int) -> subprocess.CompletedProcess:
    args = ["check-train", "--pte", str(pte), "--data", str(data), "--config", str(cfg_yaml), "--round", str(rnd)]
    return native(native_bin, *args)


@pytest.mark.slow
def test_native_round_equals_the_python_runtime_bit_for_bit(native_bin, pte, tmp_path):
    """Round 2 of partition 1 from zero B, then every evaluation method: the program's 2q losses, the projected
    gradients, the final B and every metric are the Python ExecuTorch client's, bit for bit."""
    from clients.native.client_data import write
    from fedprge.engine.seeds import step_seeds
    from fedprge.personalize import personalize
    from fedprge.task import Task

    cfg = config("client.backend=executorch", f"client.pte={pte}")
    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    data = write(cfg, 1, tmp_path / "data.json")
    res = train_check(native_bin, pte, data, tmp_path / "run.yaml", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)

    task = Task(cfg)
    b0 = torch.zeros(task.num_params)
    want = task.train(b0, 1, 2)
    bits = lambda t: np.asarray(t, dtype=np.float32).reshape(-1).view(np.uint32).tolist()  # noqa: E731
    b = b0
    for step in range(cfg.federation.local_steps):  # each step's 2q losses, on the same inputs
        seeds, batch = step_seeds(task.spec, 2, 1, step), task.train_batch(1, 2, step)
        assert got["losses"][step] == bits(task.backend.perturbed_losses(b, batch, seeds, task.zo))
        b = task.step(b, seeds, batch)[0]
    assert got["grads"] == bits(want.projected_grads)
    assert got["b"] == bits(want.b) and torch.equal(b, want.b)
    assert got["loss"] == want.loss
    assert got["directions_equal"]
    states = personalize(task, list(cfg.eval.personalization), b0, 1, want.b, None)
    metrics = {}
    for method, p in states.items():
        metrics.update({f"{method}_{k}": v for k, v in task.evaluate(p.b, 1).items()})
        metrics.update({f"{method}_{k}": v for k, v in p.chosen.items()})
    assert got["metrics"] == metrics
    assert set(metrics) >= {"global_loss", "finetune_steps", "local_loss", "personal_ppl", "prior_unavailable"}


def message_file(path: Path, messages) -> Path:
    """The objects a SuperLink would serve for each message (tree and contents), for ``fedprge-client replies``."""
    from base64 import b64encode

    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    enc = lambda b: b64encode(b).decode()  # noqa: E731
    rows = [
        {
            "tree": enc(get_object_tree(m).SerializeToString()),
            "objects": {i: enc(o.deflate()) for i, o in get_all_nested_objects(m).items()},
        }
        for m in messages
    ]
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.slow
def test_native_node_decodes_every_downlink_like_the_python_client(native_bin, pte, tmp_path, identity):
    """Flower messages as the server builds them, answered by the native node: the weights, pool and seeds
    downlinks (with a resent round skipped and a gap refused) give the global B and the projected gradients of the
    Python client, bit for bit, and the state file holds the synced round."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from clients.native.client_data import write
    from fedprge.federation.downlink import evaluate_message, message
    from fedprge.federation.protocol import GlobalState, RoundUpdate
    from fedprge.federation.updates import catch_up, pool_b
    from fedprge.task import Task

    bits = lambda t: np.asarray(t, dtype=np.float32).reshape(-1).view(np.uint32).tolist()  # noqa: E731
    base = ("client.backend=executorch", f"client.pte={pte}")
    data = write(config(*base), 1, tmp_path / "data.json", rounds=5)  # batches for rounds 1-5
    gen = np.random.default_rng(0)

    def answer(name: str, cfg, msgs) -> dict:
        query = Message(
            RecordDict({"setup": ConfigRecord({"config": to_yaml(cfg)})}), dst_node_id=1, message_type="query"
        )
        path = message_file(tmp_path / f"{name}.json", [query, *msgs])
        args = ["--messages", str(path), "--pte", str(pte), "--data", str(data), "--state", str(tmp_path / name)]
        res = native(native_bin, "replies", *args)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout)
        assert out["replies"][0]["info"] == {"partition": 1, "num_examples": 16, "num_params": 1536}
        return out

    cfg = config(*base, "federation.downlink=weights", "eval.personalization=[global]")
    task = Task(cfg)
    b1, b2 = (torch.from_numpy(gen.normal(0, 0.02, task.num_params).astype(np.float32)) for _ in range(2))
    out = answer(
        "weights",
        cfg,
        [
            message(1, 2, "train", GlobalState("weights", b=b1)),
            evaluate_message(1, 3, GlobalState("weights", b=b2), ["global"], True, 0, "", validate=True),
        ],
    )
    want = task.train(b1, 1, 2)
    assert out["replies"][1]["update"]["projected_grads"] == bits(want.projected_grads)
    assert out["replies"][2]["metrics"]["global_loss"] == task.evaluate(b2, 1)["loss"]
    assert out["replies"][2]["metrics"]["global_val_loss"] == task.validation_loss(b2, 1)  # the final evaluation's
    assert (out["global_b"], out["synced"], out["personal_b"]) == (bits(b2), 2, bits(want.b))

    cfg = config(*base, "federation.downlink=pool", "federation.pool_size=16")
    task = Task(cfg)
    coefs = gen.normal(0, 1, 16).astype(np.float32)
    out = answer("pool", cfg, [message(1, 1, "train", GlobalState("pool", pool_coefs=coefs))])
    b = pool_b(task.spec, coefs, task.num_params, task.zo)
    assert out["global_b"] == bits(b) and out["synced"] == 0
    assert out["replies"][1]["update"]["projected_grads"] == bits(task.train(b, 1, 1).projected_grads)

    cfg = config(*base)
    task = Task(cfg)
    r1, r2 = (
        RoundUpdate(r, [int(s) for s in gen.integers(0, 2**32, 8)], gen.normal(0, 1, 8).astype(np.float32))
        for r in (1, 2)
    )
    out = answer(
        "seeds",
        cfg,
        [
            message(1, 2, "train", GlobalState("seeds", updates=[r1])),
            message(1, 3, "train", GlobalState("seeds", updates=[r1, r2])),  # round 1 again: skipped
            message(1, 5, "train", GlobalState("seeds", updates=[RoundUpdate(4, [7], np.ones(1, np.float32))])),
        ],
    )
    b, synced = catch_up(torch.zeros(task.num_params), 0, [r1, r2], task.zo)
    assert out["replies"][2]["update"]["projected_grads"] == bits(task.train(b, 1, 3).projected_grads)
    assert out["replies"][3] == {"error": "seed update for round 4 arrived but this node is at round 2"}
    assert (out["global_b"], out["synced"]) == (bits(b), synced) and synced == 2


@pytest.mark.slow
def test_bad_input_gives_one_line_errors_naming_the_value(native_bin, pte, tmp_path):
    from clients import fleet as fl
    from clients.native.client_data import write
    from clients.native.launch import pem_keys

    cfg = config("client.backend=executorch", f"client.pte={pte}")
    data = write(cfg, 0, tmp_path / "data.json")
    (tmp_path / "q2.yaml").write_text(to_yaml(config("zo.q=2")))
    msg = one_line_error(train_check(native_bin, pte, data, tmp_path / "q2.yaml", 1))
    assert "zo.q: the program has 4, the run 2" in msg and str(pte) in msg

    lone = tmp_path / "lone.pte"
    lone.write_bytes(pte.read_bytes())
    (tmp_path / "run.yaml").write_text(to_yaml(cfg))
    assert "no sidecar spec" in one_line_error(train_check(native_bin, lone, data, tmp_path / "run.yaml", 1))

    other = write(config("data.max_len=24"), 0, tmp_path / "other.json")
    msg = one_line_error(train_check(native_bin, pte, other, tmp_path / "run.yaml", 1))
    assert "exported for data.max_len=24, the run has 32" in msg

    node = ["--pte", str(pte), "--data", str(data), "--state", str(tmp_path / "state.bin")]
    port = fl.free_port()
    t0 = time.monotonic()
    res = native(native_bin, "--superlink", f"127.0.0.1:{port}", "--insecure", "--max-wait", "3", *node)
    assert f"cannot reach the SuperLink at 127.0.0.1:{port}" in one_line_error(res)
    assert time.monotonic() - t0 < 60

    certs = fl.ensure_certificates(tmp_path / "certs")
    link = fl.Fleet(tmp_path / "link", certs, auth=True)
    try:
        link.start_superlink(cwd=tmp_path)
        key, _ = pem_keys(tmp_path / "keys", 0)  # never registered
        tls = ["--superlink", f"127.0.0.1:{link.port}", "--root-certificates", str(certs.ca)]
        res = native(native_bin, *tls, "--auth-key", str(key), "--max-wait", "10", *node)
        assert f"refused this node's key '{key}'" in one_line_error(res)
        res = native(native_bin, *tls, "--auth-key", str(tmp_path / "missing.pem"), *node)
        assert "missing.pem' does not exist" in one_line_error(res)
    finally:
        link.stop()


# --- fleets ------------------------------------------------------------------------------------------------------
def run_fleet(tmp: Path, *args: str, timeout: float = 900, watch=None) -> tuple[int, str, Path | None]:
    """``clients/fleet.py`` with ``args`` (test_fleet's runner, with the native builds' longer deadline)."""
    return fleet(tmp, *args, timeout=timeout, watch=watch)


@pytest.mark.slow
def test_mixed_tls_auth_fleet_matches_the_python_fleet(native_bin, pte, tmp_path):
    """Two native clients and two Python SuperNodes, TLS and SuperNode authentication, every client trained in
    both rounds: the final global B is the all-Python fleet's with the same .pte, bit for bit."""
    common = ["--tls", str(tmp_path / "certs"), "--auth", "--pte", str(pte), "--config", SMOKE, *FED]
    code, out, mixed = run_fleet(tmp_path / "mixed", *common, "--native", "2")
    assert code == 0 and mixed is not None, out[-4000:]
    assert "(TLS + SuperNode auth), 4 SuperNodes" in out and "2 of them native" in out
    logs = tmp_path / "mixed" / "work" / "logs"
    for i in (0, 1):
        text = (logs / f"native-{i}.log").read_text()
        assert text.count("train reply sent") == 2 and "error" not in text, text[-2000:]
    assert [r["ok"] for r in rows(mixed / "rounds.csv")] == ["4", "4"]
    code, out, python = run_fleet(tmp_path / "python", *common)
    assert code == 0 and python is not None, out[-4000:]
    sha = [json.loads((d / "summary.json").read_text())["b_sha256"] for d in (mixed, python)]
    assert sha[0] == sha[1]
    assert torch.load(mixed / "global_b.pt").abs().max() > 1e-3  # training moved B


@pytest.mark.slow
def test_killed_native_client_catches_up_from_its_state_file(native_bin, pte, tmp_path):
    """Native client 0 is SIGKILLed as round 2's train message reaches it and restarted at once with the same key
    and state file: round 2 closes at its deadline without it, round 3 it catches up (from the round its state file
    holds) and trains, and the final evaluation has all four clients."""
    restarted: list[subprocess.Popen] = []

    def kill_and_restart(work: Path) -> None:
        log = work / "logs" / "native-0.log"
        if restarted or not log.exists() or "round 2: train message received" not in log.read_text():
            return
        os.killpg(int((work / "native-0.pid").read_text()), signal.SIGKILL)
        cmd = shlex.split((work / "native-0" / "command").read_text())
        with (work / "logs" / "native-0-restarted.log").open("wb") as f:
            restarted.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        code, out, run = run_fleet(
            tmp_path,
            *["--tls", str(tmp_path / "certs"), "--auth", "--pte", str(pte), "--native", "2", "--config", SMOKE],
            *[*FED, "federation.rounds=3", "federation.timeout_s=30", "eval.personalization=[global,personal]"],
            watch=kill_and_restart,
        )
    finally:
        for p in restarted:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
    assert restarted, out[-4000:]
    assert code == 0 and run is not None, out[-4000:]
    assert [r["ok"] for r in rows(run / "rounds.csv")] == ["4", "3", "4"]
    again = (tmp_path / "work" / "logs" / "native-0-restarted.log").read_text()
    assert "caught up from round 1 to 2" in again and again.count("train reply sent") == 1, again[-3000:]
    assert sorted(r["partition"] for r in rows(run / "clients.csv")) == ["0", "1", "2", "3"]
