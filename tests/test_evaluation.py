"""The evaluation never loses a client silently: a deadline that follows progress, retries, and loud reporting.

The simulations are real Flower runs (Ray backend, 2 workers, evaluation faults injected inside the real ClientApp)
on the smoke config with 4 clients and 1 round; the summary arithmetic is tested on hand-made rows.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re

import pytest
import torch
from rich.console import Console

from fedprge.config import load_config
from fedprge.federation import faults
from fedprge.federation.traffic import Traffic
from fedprge.results import RunWriter
from fedprge.simulate import simulate

SMOKE = "configs/smoke.yaml"
ONE_ROUND = ["federation.rounds=1", "eval.every=0"]  # evaluations: round 0 (untuned) and the final one
# seed 0: faults.eval_straggler_rate=0.1 picks client 2 only, faults.eval_drop_rate=0.5 clients 1 and 2, 0.1 client 1
SLOW_ALL = ["faults.eval_straggler_rate=1", "faults.eval_delay_s=4"]
DELAY, TIMEOUT = 4, 7  # with 2 workers and 4 slow clients a wave takes >= 2 x 4 s, more than one 7 s deadline


def _cfg(*overrides: str):
    return load_config([SMOKE], list(overrides))


def _run(tmp_path, name: str, *overrides: str) -> dict:
    cfg = _cfg(f"name={name}", *ONE_ROUND, *overrides)
    out = io.StringIO()
    writer = RunWriter(cfg, out=tmp_path / name, progress=False, console=Console(file=out, width=200))
    log, handler = logging.getLogger("fedprge"), logging.StreamHandler(io.StringIO())
    log.addHandler(handler)
    try:
        summary = simulate(cfg, writer)
    finally:
        log.removeHandler(handler)
    with open(writer.dir / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    return {
        "summary": summary,
        "clients": clients,
        "terminal": out.getvalue(),
        "log": handler.stream.getvalue(),  # the server's warnings (the level of the logger as the run left it)
        "b": torch.load(writer.dir / "global_b.pt"),
    }


NEVER = ["faults.eval_drop_rate=0.1", "faults.eval_drop_attempts=2"]  # client 1 fails both tries (retries=1)


@pytest.fixture(scope="module")
def never_run(tmp_path_factory) -> dict:
    """The run whose client 1 never answers (shared: its other clients are the clean reference of the retry test)."""
    return _run(tmp_path_factory.mktemp("never"), "never", *NEVER)


def _wave_seconds(log: str) -> list[float]:
    return [float(s) for s in re.findall(r"evaluation at round \d+: 4 of 4 clients in ([0-9.]+) s", log)]


def test_a_slow_evaluation_that_keeps_progressing_loses_no_client(tmp_path, caplog):
    """Every client answers every evaluation DELAY s late; no retries, so only the progress deadline can save it."""
    caplog.set_level(logging.INFO, logger="fedprge.server")
    cfg = _cfg(*SLOW_ALL)
    assert all(faults.eval_fault_for(cfg, p).delay_s == DELAY for p in range(4))
    run = _run(
        tmp_path, "slow", *SLOW_ALL, f"eval.timeout_s={TIMEOUT}", "eval.retries=0", "eval.personalization=[global]"
    )
    s = run["summary"]
    assert (s["clients_expected"], s["clients_evaluated"], s["missing"]) == (4, 4, [])
    assert s["untuned_evaluation"] == {"clients_expected": 4, "clients_evaluated": 4, "missing": []}
    assert s["clients_compared"] == 4 and s["missing_untuned"] == []
    assert all(st["clients"] == 4 for st in s["methods"].values())
    waves = _wave_seconds(caplog.text)
    assert len(waves) == 2 and min(waves) > TIMEOUT, waves  # one deadline for the wave would have cut clients off
    assert "sending it again" not in caplog.text
    assert "4 of 4 clients" in run["terminal"] and "not evaluated" not in run["terminal"]


def test_a_failed_first_attempt_is_retried_and_gives_the_same_numbers(tmp_path, caplog, never_run):
    caplog.set_level(logging.WARNING, logger="fedprge.server")
    drop = ["faults.eval_drop_rate=0.5"]
    cfg = _cfg(*drop)
    assert [p for p in range(4) if faults.eval_fault_for(cfg, p, attempt=0).drop] == [1, 2]
    assert not any(faults.eval_fault_for(cfg, p, attempt=1).drop for p in range(4))
    retried = _run(tmp_path, "retried", *drop)
    s = retried["summary"]
    assert (s["clients_expected"], s["clients_evaluated"], s["missing"]) == (4, 4, [])
    assert s["untuned_evaluation"]["missing"] == []
    for rnd in (0, 1):
        for p in (1, 2):
            reason = f"injected fault: client {p} failed evaluation attempt 1"
            assert f"evaluation at round {rnd}: no accepted reply from client {p} ({reason}); sending it again " in (
                caplog.text
            )
    # a retried client computes exactly what it would have computed the first time: client 2 answered the never
    # run at its first try (only client 1 fails there), and evaluation faults do not touch training (same B)
    clean = {r["partition"]: r for r in never_run["clients"]}
    assert [r for r in retried["clients"] if r["partition"] != "1"] == [clean[p] for p in ("0", "2", "3")]
    assert torch.equal(retried["b"], never_run["b"])


def test_a_client_that_never_answers_is_named_with_its_reason(never_run, caplog):
    cfg = _cfg(*NEVER)
    assert [p for p in range(4) if faults.eval_fault_for(cfg, p, attempt=1).drop] == [1]
    run = never_run
    s, reason = run["summary"], "injected fault: client 1 failed evaluation attempt 2"
    assert (s["clients_expected"], s["clients_evaluated"]) == (4, 3)
    assert s["missing"] == [{"partition": 1, "reason": reason}]
    assert s["untuned_evaluation"] == {"clients_expected": 4, "clients_evaluated": 3, "missing": s["missing"]}
    assert sorted(int(r["partition"]) for r in run["clients"]) == [0, 2, 3]
    assert all(st["clients"] == 3 for st in s["methods"].values()) and s["clients_compared"] == 3
    assert "3 of 4 clients" in run["terminal"]
    assert f"1 of 4 clients not evaluated: client 1 ({reason})" in run["terminal"]
    assert f"evaluation at round 1 covers 3 of 4 clients; missing: client 1 ({reason})" in run["log"]


def test_the_final_evaluation_reports_the_global_validation_loss(never_run):
    """``global_val_loss`` in clients.csv is each evaluated client's validation loss of the final global B (what
    simulations/equal_compute.py tunes on), its mean is in summary.json, and the curve clients are named there."""
    from fedprge.task import Task

    task = Task(_cfg(*NEVER))
    s, rows = never_run["summary"], never_run["clients"]
    got = {int(r["partition"]): float(r["global_val_loss"]) for r in rows}
    assert sorted(got) == [0, 2, 3] and all(task.client(p).val for p in got)
    for p, loss in got.items():
        assert loss == pytest.approx(task.validation_loss(never_run["b"], p), rel=1e-5)
        assert loss != pytest.approx(float(next(r for r in rows if int(r["partition"]) == p)["global_loss"]))
    assert s["global_val_loss"] == pytest.approx(sum(got.values()) / 3, rel=1e-6)
    assert s["curve_partitions"] == [0, 1, 2, 3]


def test_a_client_without_a_reply_is_given_up_after_the_progress_deadline(tmp_path):
    """Client 2 answers 15 s late; the others answer at once, so after 5 s without a reply the wave gives up. Three
    workers: the late client's abandoned evaluation keeps one busy, and the two others keep the next wave going."""
    late = ["faults.eval_straggler_rate=0.1", "faults.eval_delay_s=15", "eval.timeout_s=5", "eval.retries=0"]
    run = _run(tmp_path, "late", *late, "eval.personalization=[global]", "sim.cpus=3")
    s, reason = run["summary"], "no reply after 1 try (eval.timeout_s=5)"
    assert (s["clients_expected"], s["clients_evaluated"]) == (4, 3)
    assert s["missing"] == [{"partition": 2, "reason": reason}]
    assert s["untuned_evaluation"]["missing"] == s["missing"]
    assert f"client 2 ({reason})" in run["terminal"]


# --- the summary, on hand-made rows ------------------------------------------------------------------------------
def test_a_client_without_an_untuned_metric_is_not_counted_as_improved(tmp_path):
    """Issue 16: an untuned metric of NaN made ``(global > nan) == higher`` count the client as improved."""
    cfg = _cfg("eval.personalization=[global]")
    writer = RunWriter(cfg, out=tmp_path, progress=False, console=Console(file=io.StringIO(), width=200))
    writer.rounds = [{"ok": 1, "uplink_bytes_per_client": 1.0, "downlink_bytes_per_client": 1.0}]
    before = [{"partition": p, "global_loss": 10.0} for p in (0, 2, 3)]  # client 1's round-0 evaluation is missing
    after = [{"partition": p, "global_loss": 10.5} for p in range(4)]  # worse than untuned for everyone
    lost = [{"partition": 1, "reason": "no reply after 2 tries (eval.timeout_s=600)"}]
    s = writer.finish(torch.zeros(3), Traffic(), before, after, 1.0, 3, missing_before=lost)
    assert s["clients_improved_by_global"] == 0 and s["clients_compared"] == 3
    assert s["missing_untuned"] == lost
    assert s["methods"]["untuned"]["clients"] == 3 and s["methods"]["global"]["clients"] == 4
    assert math.isclose(s["methods"]["untuned"]["mean"], 10.0)
    assert (s["clients_expected"], s["clients_evaluated"], s["missing"]) == (4, 4, [])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.timeout_s=0", "eval.timeout_s=0.0 is invalid; it must be finite and > 0"),
        ("eval.retries=-1", "eval.retries=-1 is invalid; it must be >= 0"),
        ("faults.eval_straggler_rate=2", "faults.eval_straggler_rate=2.0 is invalid; it must be in [0, 1]"),
        ("faults.eval_delay_s=-1", "faults.eval_delay_s=-1.0 is invalid; it must be finite and >= 0"),
        ("faults.eval_drop_rate=-0.1", "faults.eval_drop_rate=-0.1 is invalid; it must be in [0, 1]"),
        ("faults.eval_drop_attempts=-1", "faults.eval_drop_attempts=-1 is invalid; it must be >= 0"),
    ],
)
def test_bad_evaluation_settings_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg(override)
