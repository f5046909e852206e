"""DP-ZO: what a client sends is clipped and noised yet replayed exactly, and the accountant's numbers are reported."""

import csv
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedprge import privacy
from fedprge.config import load_config
from fedprge.engine import rng
from fedprge.engine.estimator import StepRecord, replay
from fedprge.engine.seeds import DP_NOISE, step_seeds
from fedprge.results import RunWriter
from fedprge.simulate import simulate
from fedprge.task import Task

SMOKE = "configs/smoke.yaml"
SMOKE_B_SHA = "a48d2e59b89502b0337699950a344b01bb2e24d1493607e021674060505940f0"
LOCAL = ["privacy.mode=local", "privacy.clip=0.3", "privacy.noise_multiplier=0.5"]


def run(tmp_path, name, *overrides):
    cfg = load_config([SMOKE], [f"name={name}", *overrides])
    writer = RunWriter(cfg, out=tmp_path / name, progress=False)
    summary = simulate(cfg, writer)
    with open(writer.dir / "rounds.csv") as f:
        return summary, list(csv.DictReader(f))


def rdp_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, rate, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def task():
    return Task(load_config([SMOKE], LOCAL))


def test_local_dp_client_applies_and_sends_the_clipped_noised_scalars(task):
    cfg, b0, rnd, part = task.cfg, torch.zeros(task.num_params), 2, 1
    out = task.train(b0, part, rnd)
    steps, q = out.projected_grads.shape
    sigma, clip = cfg.privacy.noise_multiplier, cfg.privacy.clip
    noise = np.stack([privacy.noise(privacy.step_rule(cfg, rnd, part, t).seed, q, sigma * clip) for t in range(steps)])
    signal = out.projected_grads - noise  # what the client clipped before noising
    assert np.all(np.linalg.norm(signal, axis=1) <= clip / math.sqrt(steps) * (1 + 1e-5))
    assert np.linalg.norm(signal) <= clip * (1 + 1e-5)  # the round vector: L2 <= C
    assert privacy.step_rule(cfg, rnd, part, 0).std == pytest.approx(sigma * clip)
    # the sent vector: at most C of signal plus noise of expected norm sigma C sqrt(T q), on every step its own
    expected = sigma * clip * math.sqrt(steps * q)
    assert 0.25 * expected < np.linalg.norm(out.projected_grads) < clip + 3 * expected
    assert len({tuple(n) for n in noise}) == steps
    records = [StepRecord(tuple(step_seeds(task.spec, rnd, part, t)), tuple(out.projected_grads[t])) for t in range(3)]
    assert torch.equal(replay(b0, records, task.zo.lr, task.zo.distribution), out.b)  # the server's replay is exact
    again = task.train(b0, part, rnd)
    assert np.array_equal(again.projected_grads, out.projected_grads)  # simulation noise: reproducible


def test_noise_scale_is_sigma_times_clip_and_sigma_is_the_accountants():
    cfg = load_config([SMOKE], ["privacy.mode=local", "privacy.epsilon=4", "privacy.clip=0.7"])
    sigma = get_noise_multiplier(target_epsilon=4, target_delta=1e-5, sample_rate=0.5, steps=3)
    rule = privacy.step_rule(cfg, 1, 0, 0)
    assert rule.std == pytest.approx(sigma * 0.7) and rule.bound == pytest.approx(0.7 / math.sqrt(3))
    spent = privacy.report(cfg)["epsilon"]
    assert 4 - 0.01 <= spent <= 4  # calibration hits the target within Opacus's tolerance
    assert privacy.step_rule(load_config([SMOKE]), 1, 0, 0) is None  # mode off: no rule at all


def test_reported_epsilon_is_the_accountants_and_moves_the_right_way():
    base = ["privacy.mode=local", "privacy.noise_multiplier=1.1", "privacy.delta=1e-6"]
    rep = privacy.report(load_config([SMOKE], base))
    assert rep["sample_rate"] == 0.5 and rep["rounds"] == 3
    assert rep["epsilon"] == pytest.approx(rdp_epsilon(1.1, 0.5, 3, 1e-6), rel=1e-12)
    assert rep["epsilon_sample_known"] == pytest.approx(rdp_epsilon(1.1, 1.0, 3, 1e-6), rel=1e-12)
    more_rounds = privacy.report(load_config([SMOKE], [*base, "federation.rounds=30"]))["epsilon"]
    more_noise = privacy.report(load_config([SMOKE], [*base[:1], "privacy.noise_multiplier=2.2"]))["epsilon"]
    assert more_rounds > rep["epsilon"] > more_noise
    assert privacy.report(load_config([SMOKE], [*base[:1]]))["epsilon"] == math.inf  # clipping only


def test_central_noise_is_added_once_per_direction_scaled_to_the_mean():
    cfg = load_config([SMOKE], ["privacy.mode=central", "federation.seed_scope=round", "privacy.noise_multiplier=2"])
    merged = {11: np.float32(0.5), 7: np.float32(-0.25), 3: np.float32(0.0)}
    noised = dict(merged)
    privacy.noise_aggregate(cfg, 4, noised, 0.5)
    expected = privacy.noise(rng.derive_seed(cfg.seed, DP_NOISE, privacy.SERVER, 4), 3, 2 * 1.0 * 0.5)
    assert list(noised) == list(merged)
    assert np.allclose([noised[k] - merged[k] for k in merged], expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["privacy.mode=laplace"], "privacy.mode='laplace'.*off"),
        (["privacy.clip=0"], "privacy.clip=0"),
        (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1"),
        (["privacy.delta=1"], "privacy.delta=1"),
        (["privacy.mode=local", "privacy.delta=0.3"], "privacy.delta=0.3.*federation.clients"),
        (["privacy.mode=local", "privacy.epsilon=2", "privacy.noise_multiplier=1"], "privacy.epsilon=2.*not both"),
        (["privacy.mode=central"], "federation.seed_scope='client'.*privacy.mode='central'"),
        (
            ["privacy.mode=central", "federation.seed_scope=round", "federation.aggregation=median"],
            "federation.aggregation='median'.*privacy.mode='central'",
        ),
        (
            ["privacy.mode=central", "federation.seed_scope=round", "federation.downlink=pool"],
            "federation.downlink='pool'.*privacy.mode='central'",
        ),
        (["privacy.mode=local", "federation.algorithm=fedavg_lora"], "federation.algorithm='fedavg_lora'.*privacy"),
    ],
)
def test_bad_privacy_values_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        load_config([SMOKE], override)


@pytest.mark.slow
def test_privacy_off_leaves_the_smoke_run_bit_identical(tmp_path):
    """The smoke run's global B, pinned: it changes only when training itself is meant to change (then update it)."""
    summary, _ = run(tmp_path, "off")
    assert summary["b_sha256"] == SMOKE_B_SHA
    assert "privacy" not in summary


@pytest.mark.parametrize("mode", ["local", pytest.param("central", marks=pytest.mark.slow)])
def test_dp_run_reconstructs_exactly_and_reports_what_it_spent(tmp_path, mode):
    extra = ["federation.seed_scope=round", "privacy.mode=central"] if mode == "central" else []
    summary, rounds = run(tmp_path, mode, *LOCAL, *extra, "federation.verify=true")
    errors = [float(r["reconstruction_error"]) for r in rounds]
    assert len(rounds) == 3 and all(not math.isnan(e) and e <= 1e-6 for e in errors), errors
    p = summary["privacy"]
    assert (p["mode"], p["noise_multiplier"], p["clip"], p["rounds"]) == (mode, 0.5, 0.3, 3)
    assert p["epsilon"] == pytest.approx(rdp_epsilon(0.5, 0.5, 3, 1e-5), rel=1e-12)
    assert summary["b_sha256"] != SMOKE_B_SHA
