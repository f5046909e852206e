"""Real clients: the ExecuTorch client backend, and fleets of Flower SuperNodes started by ``clients/fleet.py``.

The fleets are real processes talking Flower's Fleet API (HTTP in flwr 1.42) over loopback: a SuperLink, 2-4
SuperNodes, one ClientApp process per message, the ServerApp run by ``flwr run``. The fleet runs take 1-3 minutes
on two busy cores and are marked slow, as is everything that exports a program (the ``pte`` fixture, which also
skips when ExecuTorch is not installed).
"""

from __future__ import annotations

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
from fedprge.results import RunWriter

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
# The federation every fleet/simulation comparison runs: 4 clients, 2 of them per round, 2 rounds.
FED = [
    "federation.clients=4",
    "federation.fraction=0.5",
    "federation.rounds=2",
    "eval.every=0",
    "eval.personalization=[global]",
]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def config(*overrides: str):
    return load_config([SMOKE], [*FED, *overrides])


@pytest.fixture(scope="module")
def pte(tmp_path_factory) -> Path:
    """A portable-kernel .pte that matches :func:`config` (exports in ~10-25 s here)."""
    pytest.importorskip("executorch")
    from fedprge.export.backend import export_args

    out = tmp_path_factory.mktemp("pte") / "smoke.pte"
    cmd = [sys.executable, "-m", "fedprge.export", *export_args(config()), "--backend", "portable", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def pte_config(pte: Path, *overrides: str):
    return config("client.backend=executorch", f"client.pte={pte}", *overrides)


# --- the ExecuTorch client backend, in process -------------------------------------------------------------------
def test_client_section_is_validated():
    with pytest.raises(
        ValueError, match=r"client.backend='tflite' is invalid; choose one of \('eager', 'executorch'\)"
    ):
        config("client.backend=tflite")
    with pytest.raises(ValueError, match="client.pte=None is invalid; client.backend=executorch needs a .pte"):
        config("client.backend=executorch")
    with pytest.raises(ValueError, match="a program is only used with client.backend=executorch"):
        config("client.pte=x.pte")
    with pytest.raises(
        ValueError, match=r"federation.min_nodes=5 is invalid; it must be in \[0, federation.clients=4\]"
    ):
        config("federation.min_nodes=5")


def test_node_config_picks_the_backend():
    from fedprge.task import client_overrides

    assert client_overrides({"partition-id": 0}) == (None, None)
    assert client_overrides({"pte": "/p.pte"}) == ("executorch", "/p.pte")
    assert client_overrides({"backend": "eager"}) == ("eager", None)


@pytest.mark.slow
def test_pte_task_trains_and_evaluates_like_the_eager_task(pte):
    """Same seeds, same batches: the program's losses are the eager ones to ~1 fp32 ulp, so g agrees to ~1e-4
    (the ulp divided by 2 eps) and B to ~1e-5; held-out losses agree to 1e-5."""
    from fedprge.task import Task

    eager, prog = Task(config()), Task(pte_config(pte))
    assert prog.num_params == eager.num_params
    b0 = torch.zeros(eager.num_params)
    want, got = eager.train(b0, 1, 1), prog.train(b0, 1, 1)
    assert got.projected_grads.shape == want.projected_grads.shape == (3, 4)
    assert abs(got.projected_grads - want.projected_grads).max() < 2e-3
    torch.testing.assert_close(got.b, want.b, rtol=0, atol=1e-4)
    assert abs(got.loss - want.loss) < 1e-5
    assert prog.evaluate(want.b, 1)["loss"] == pytest.approx(eager.evaluate(want.b, 1)["loss"], abs=1e-5)
    personal = prog.local_steps(b0, 1, 2, tag=1)
    torch.testing.assert_close(personal, eager.local_steps(b0, 1, 2, tag=1), rtol=0, atol=1e-4)
    # the program's nll gives per-example sums: the language-modelling prior is unavailable there, and says so
    from fedprge.personalize import prior

    assert prior(prog, b0, 1).chosen == {"unavailable": 1.0} and prior(eager, b0, 1).chosen["lambda"] > 0


@pytest.mark.slow
def test_pte_that_does_not_match_the_run_is_refused(pte, tmp_path):
    from fedprge.export.backend import load_pte_backend

    with pytest.raises(
        ValueError,
        match=r"zo.q: the program has 4, the run 2.*data.max_len=64 > the program's 32.*"
        r"python -m fedprge.export --model tiny --q 2",
    ):
        load_pte_backend(pte_config(pte, "zo.q=2", "data.max_len=64"))
    with pytest.raises(FileNotFoundError, match="client.pte=.*missing.pte' does not exist on this client"):
        load_pte_backend(pte_config(tmp_path / "missing.pte"))
    lone = tmp_path / "lone.pte"
    lone.write_bytes(pte.read_bytes())
    with pytest.raises(ValueError, match="no sidecar spec 'lone.json'"):
        load_pte_backend(pte_config(lone))


@pytest.mark.slow
def test_executorch_client_process_loads_no_model(pte):
    """What a SuperNode's ClientApp process imports for a train and an evaluate message: no model, no peft, no
    transformers modeling code, no ExecuTorch compiler; just the runtime binding, the program and a tokenizer."""
    code = f"""
import sys, torch
from fedprge.config import load_config, to_yaml
from fedprge.federation import client_app  # what flwr-clientapp imports
from fedprge.task import client_overrides, load_task
cfg = load_config([{SMOKE!r}], {FED!r})
task = load_task(to_yaml(cfg), *client_overrides({{"pte": {str(pte)!r}}}))
task.evaluate(task.train(torch.zeros(task.num_params), 0, 1).b, 0)
bad = [m for m in sys.modules if m == "peft" or m.startswith(("transformers.modeling_utils", "executorch.exir"))]
print(type(task.backend).__name__, bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "PTEBackend []"


def test_fleet_refuses_to_start_without_a_security_choice(tmp_path):
    for args, msg in (([], "choose --tls DIR"), (["--insecure", "--auth"], "--auth needs --tls")):
        out = subprocess.run(
            [sys.executable, "clients/fleet.py", *args, "--work", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and msg in out.stderr


def test_self_signed_certificates_cover_loopback(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    sys.path.insert(0, str(REPO))
    from clients.fleet import ensure_certificates

    certs = ensure_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    before = certs.cert.read_bytes()
    assert ensure_certificates(tmp_path / "certs").cert.read_bytes() == before  # made once, then reused


def test_docs_devices_pseudocode_reproduces_the_generator():
    """docs/devices.md §4 re-implemented in plain Python ints, as a Kotlin/Swift port would, against rng."""
    import numpy as np

    from fedprge.engine import rng

    m = 0xFFFFFFFF

    def hash32(x: int) -> int:
        x &= m
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    def derive_seed(*parts: int) -> int:
        h = 0x2545F491
        for p in parts:
            h = hash32(h ^ hash32(p & m) ^ hash32((p >> 32) + 0x51ED27))
        return h

    def bits(seed: int, i: int) -> int:
        k1 = hash32(seed ^ 0x9E3779B9)
        return hash32(hash32(i ^ k1) ^ hash32(k1 + 0x632BE5AB))

    table = rng.gaussian_table().numpy()
    assert [hash32(x) for x in (0, 1, 0xDEADBEEF, m)] == [0, 0x688990C0, 0xE628C683, 0x6768824A]
    assert [derive_seed(0), derive_seed(0, 1, 1, 0, 0, 0), derive_seed(2**40 + 5)] == [47420602, 1586352517, 1630517184]
    assert [derive_seed(0, 1, 1, 3, 0, i) for i in range(4)] == [2438593231, 1958253472, 570114558, 3908649141]
    assert [bits(7, i) for i in range(4)] == [0xDB91DBDF, 0x99F767D2, 0xA14CD1DA, 0x89BE91F5]
    assert np.float32(table[bits(7, 0) >> 16]).view(np.uint32) == 0x3F88F5E8
    for seed in (0, 7, 123456789, 2**32 - 1):
        for parts in ((seed,), (seed, 1, 2, 3), (seed, 2**35)):
            assert derive_seed(*parts) == rng.derive_seed(*parts)
        counters = [0, 1, 2, 999, 184319, 2**31 + 5]
        want = torch.cat([rng.bits(torch.tensor([seed]), 1, c)[0] for c in counters]).tolist()
        assert [bits(seed, c) for c in counters] == want
        z = rng.directions([seed], 64)[0].numpy()
        assert np.array_equal(np.array([table[bits(seed, i) >> 16] for i in range(64)], np.float32), z)
        r = rng.directions([seed], 64, "rademacher")[0].numpy()
        assert np.array_equal(np.array([1.0 if bits(seed, i) >> 31 else -1.0 for i in range(64)], np.float32), r)


# --- fleets of SuperNodes ---------------------------------------------------------------------------------------
def fleet(tmp: Path, *args: str, timeout: float = 420, watch=None) -> tuple[int, str, Path | None]:
    """Run ``clients/fleet.py``; ``watch(work)`` is polled while it runs. Returns (code, output, run folder)."""
    work, out = tmp / "work", tmp / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "clients/fleet.py", "--work", str(work), "--out", str(out), *args]
    log = tmp / "fleet.out"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fleet did not finish in {timeout} s:\n{log.read_text()[-4000:]}")
                if watch is not None:
                    watch(work)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # fleet.py stops its processes on Ctrl-C
                proc.wait(timeout=60)
    runs = sorted(out.glob("*/summary.json")) if out.exists() else []
    return proc.returncode, log.read_text(), runs[-1].parent if runs else None


def simulate_b(tmp: Path, cfg) -> torch.Tensor:
    from fedprge.simulate import simulate

    writer = RunWriter(cfg, out=tmp, progress=False)
    simulate(cfg, writer)
    return torch.load(writer.dir / "global_b.pt")


@pytest.fixture(scope="module")
def pte_fleet(pte, tmp_path_factory) -> Path:
    """4 ExecuTorch SuperNodes over loopback, plain HTTP; the run folder."""
    tmp = tmp_path_factory.mktemp("fleet")
    code, out, run = fleet(tmp, "--insecure", "--pte", str(pte), "--config", SMOKE, *FED)
    assert code == 0 and run is not None, out[-4000:]
    assert "4 SuperNodes (executorch clients" in out
    return run


@pytest.mark.slow
def test_executorch_fleet_matches_the_simulation_exactly(pte, pte_fleet, tmp_path):
    """Same program, same seeds, same batches: the fleet's global B equals the Ray simulation's bit for bit."""
    fleet_b = torch.load(pte_fleet / "global_b.pt")
    sim_b = simulate_b(tmp_path / "sim", pte_config(pte))
    assert torch.equal(fleet_b, sim_b)
    assert fleet_b.abs().max() > 1e-3  # training moved B
    assert [r["ok"] for r in rows(pte_fleet / "rounds.csv")] == ["2", "2"]  # both sampled clients, both rounds


@pytest.mark.slow
def test_eager_simulation_is_within_fp32_noise_of_the_executorch_fleet(pte_fleet, tmp_path):
    """Eager PyTorch and the ExecuTorch program agree on each loss to ~1 ulp (1e-6 at a loss of 10.8); divided by
    2 eps = 0.02 that is ~5e-5 in g, so after 2 rounds B agrees to ~1e-5 absolute (seen: 1.2e-5 of max |B| 0.037,
    i.e. 3e-4 relative). Asserted: 1e-4 absolute and 2e-3 relative (L2); whether the two are bit-equal is a rounding
    accident and not asserted. The tolerance is meaningful only if training moved B far beyond it: max |B| is ~0.04,
    so B must exceed 100 x the tolerance (a B that barely moved would pass any closeness check)."""
    fleet_b = torch.load(pte_fleet / "global_b.pt")
    eager_b = simulate_b(tmp_path / "sim", config())
    assert eager_b.abs().max() > 100 * 1e-4, eager_b.abs().max()
    torch.testing.assert_close(fleet_b, eager_b, rtol=0, atol=1e-4)
    assert float((fleet_b - eager_b).norm() / eager_b.norm()) < 2e-3


@pytest.mark.slow
def test_fleet_goes_on_without_a_missing_and_a_killed_supernode(pte, tmp_path):
    """4 clients configured, 3 SuperNodes started (partition 3 never connects), SuperNode 1 SIGKILLed (with its
    ClientApp) as round 2's train message reaches it. The server starts with 3 after node_wait_s, finishes round 2
    and the final evaluation with the others, and says so."""
    killed: list[int] = []

    def kill_node_1_in_round_2(work: Path) -> None:
        log = work / "logs" / "supernode-1.log"
        if killed or not log.exists():
            return
        text = log.read_text(errors="replace")
        if re.search(r"ROUND 2\][^\n]*\n[^\n]*Receiving: train message", text):
            pid = int((work / "supernode-1.pid").read_text())
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)

    code, out, run = fleet(
        tmp_path,
        "--insecure",
        "--pte",
        str(pte),
        "--nodes",
        "3",
        "--config",
        SMOKE,
        "federation.clients=4",
        "federation.fraction=1.0",
        "federation.rounds=2",
        "eval.every=0",
        "eval.personalization=[global]",
        "federation.min_nodes=2",
        "federation.node_wait_s=8",
        "federation.timeout_s=25",
        "federation.setup_timeout_s=60",
        "eval.timeout_s=60",  # the killed node's evaluation is given up after 60 s without progress
        watch=kill_node_1_in_round_2,
    )
    assert killed, out[-4000:]
    assert code == 0 and run is not None, out[-4000:]
    assert "only 3 of 4 nodes connected within 8 s: 1 missing; starting with 3" in out
    assert re.search(r"round 2: .*client 1\b", out), out[-4000:]  # its error reply or its missing reply, named
    assert "supernode-1 (killed by signal 9)" in out
    assert [(r["sampled"], r["ok"]) for r in rows(run / "rounds.csv")] == [("3", "3"), ("3", "2")]
    assert [r["partition"] for r in rows(run / "clients.csv")] == ["0", "2"]  # the final evaluation, without 1


@pytest.mark.slow
def test_tls_fleet_with_supernode_authentication(pte, tmp_path):
    """TLS from a self-signed CA, SuperNode auth: the registered nodes run the federation; a node whose key was
    never registered is refused by the SuperLink."""
    sys.path.insert(0, str(REPO))
    from clients import fleet as fl

    certs = fl.ensure_certificates(tmp_path / "certs")
    code, out, run = fleet(
        tmp_path,
        "--tls",
        str(tmp_path / "certs"),
        "--auth",
        "--pte",
        str(pte),
        "--config",
        SMOKE,
        "federation.clients=2",
        "federation.fraction=1.0",
        "federation.rounds=1",
        "eval.personalization=[global]",
    )
    assert code == 0 and run is not None, out[-4000:]
    assert "(TLS + SuperNode auth)" in out
    node_ids = set(re.findall(r"SuperNode ID: (\d+)", (tmp_path / "work/logs/supernode-0.log").read_text()))
    assert node_ids and node_ids <= set(
        re.findall(r"Created node_id=(\d+)", (tmp_path / "work/logs/superlink.log").read_text())
    )

    rogue = fl.Fleet(tmp_path / "rogue", certs, auth=True)
    try:
        rogue.start_superlink(cwd=tmp_path)
        private, _ = fl.node_keys(tmp_path / "rogue" / "keys", 0)  # never registered
        cmd = [str(fl.BIN / "flower-supernode"), "--root-certificates", str(certs.ca)]
        cmd += ["--superlink", f"{fl.HOST}:{rogue.port}", "--port", str(fl.free_port()), "--max-retries", "1"]
        cmd += ["--node-config", "partition-id=0 num-partitions=1", "--auth-supernode-private-key", str(private)]
        proc = rogue._spawn("rogue", cmd)
        assert proc.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (rogue.logs / "rogue.log").read_text()
    finally:
        rogue.stop()
