"""Aggregation and the numeric defences, rule by rule: what ``aggregation.combine`` makes of the accepted scalars
(example-count weights, shared or own seeds, mean / trimmed mean / median) and the pure functions of ``defences.py``
at their boundaries. Real Flower messages built by hand, no simulation: milliseconds each."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from test_reliability import P, _reply, _sent, _strategy

from fedprge.engine import rng
from fedprge.engine.seeds import step_seeds
from fedprge.federation import defences
from fedprge.federation.protocol import apply_coefficients, pack_f32

G = [np.arange(1, 5, dtype=np.float32) * s for s in (1.0, -0.5, 2.0, 0.25, -1.5)]  # 4 scalars: 2 steps x q=2


def _aggregate(s, grads):
    sent = _sent(s, 1, range(len(grads)))
    stats = s.aggregate(1, [_reply(m, g) for m, g in zip(sent, grads, strict=True)], sent=sent)
    return stats, dict(zip(s.history[1].seeds, s.history[1].coefs.tolist(), strict=True))


def test_mean_weights_each_client_by_its_registered_count(identity):
    """Counts 10, 30, 20: each client's scalars enter B with weight count / 60 on its own seeds, and B is
    b0 - lr/q sum (weight x scalar x direction)."""
    s = _strategy("federation.norm_bound=0", counts=(10, 30, 20, 10))
    _, merged = _aggregate(s, G[:3])
    for p, w in ((0, 10 / 60), (1, 30 / 60), (2, 20 / 60)):
        for t in range(2):
            for seed, g in zip(step_seeds(s.spec, 1, p, t), G[p][2 * t : 2 * t + 2], strict=True):
                assert merged[seed] == pytest.approx(w * g, rel=1e-6), (p, t)
    assert len(merged) == 12
    z = rng.directions(list(merged), P).double()
    want = -s.zo.lr / s.zo.q * (torch.tensor(list(merged.values()), dtype=torch.float64)[:, None] * z).sum(0)
    assert float((s.b.double() - want).abs().max()) < 1e-7


def test_shared_seeds_mean_adds_the_weighted_scalars_seed_by_seed(identity):
    s = _strategy("federation.seed_scope=round", "federation.norm_bound=0", counts=(10, 30, 20, 10))
    _, merged = _aggregate(s, G[:2])
    assert len(merged) == 4  # one coefficient per shared seed
    want = 0.25 * G[0] + 0.75 * G[1]
    assert list(merged.values()) == pytest.approx(want.tolist(), rel=1e-6)


@pytest.mark.parametrize(("aggregation", "want"), [("median", "median"), ("trimmed_mean", "trimmed")])
def test_shared_seeds_robust_rules_take_the_coordinate_median_or_trimmed_mean(identity, aggregation, want):
    """Five clients, trim_fraction 0.2: one value cut at each end of every coordinate; the median of five is the
    middle value. Unweighted (counts differ, and must not matter)."""
    over = ["federation.seed_scope=round", f"federation.aggregation={aggregation}", "federation.norm_bound=0"]
    s = _strategy(*over, "federation.trim_fraction=0.2", counts=(1, 2, 3, 4, 5))
    stack = np.sort(np.stack(G), axis=0)
    expect = np.median(stack, axis=0) if want == "median" else stack[1:4].mean(axis=0)
    _, merged = _aggregate(s, G)
    seeds = [x for t in range(2) for x in step_seeds(s.spec, 1, 0, t)]
    assert [merged[x] for x in seeds] == pytest.approx(expect.tolist(), rel=1e-6)


def test_trimmed_mean_with_own_seeds_keeps_the_middle_norms_weighted(identity):
    s = _strategy(
        "federation.aggregation=trimmed_mean",
        "federation.trim_fraction=0.2",
        "federation.norm_bound=0",
        counts=(10, 20, 30, 40, 50),
    )
    stats, merged = _aggregate(s, G)
    norms = [float(np.linalg.norm(g)) for g in G]  # 5.48, 2.74, 10.95, 1.37, 8.22: cut 3 (smallest), 2 (largest)
    assert stats.trimmed == sorted([int(np.argmin(norms)), int(np.argmax(norms))]) == [2, 3]
    kept = {0: 10, 1: 20, 4: 50}
    for p, w in kept.items():
        seeds = step_seeds(s.spec, 1, p, 0)
        assert merged[seeds[0]] == pytest.approx(w / 80 * G[p][0], rel=1e-6)
    assert len(merged) == 12


def test_weights_are_normalised_over_the_accepted_clients_only(identity):
    """A rejected client's count is not in the denominator."""
    s = _strategy("federation.norm_bound=0", counts=(10, 30, 20, 10))
    sent = _sent(s, 1, [0, 1])
    bad = RecordDict({"update": ConfigRecord({"projected_grads": pack_f32([1.0])}), "metrics": MetricRecord({})})
    from flwr.app import Message

    s.aggregate(1, [_reply(sent[0], G[0]), Message(bad, reply_to=sent[1])], sent=sent)
    seed = step_seeds(s.spec, 1, 0, 0)[0]
    assert dict(zip(s.history[1].seeds, s.history[1].coefs.tolist(), strict=True))[seed] == pytest.approx(G[0][0])


def test_lower_median_and_norm_rules_at_their_boundaries():
    assert defences.lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0 and defences.lower_median([7.0]) == 7.0
    assert defences.lower_median([3.0, 1.0, 2.0]) == 2.0
    g = [np.array([3.0, 4.0], np.float32), np.array([0.0, 1.0], np.float32), np.array([0.0, 2.0], np.float32)]
    assert defences.norms(g) == [5.0, 1.0, 2.0]
    out, clipped, ref = defences.bound_norms(g, 2.0)  # median 2: limit 4, only the first is above it
    assert ref == 2.0 and clipped == {0: 5.0}
    assert np.allclose(out[0], [2.4, 3.2]) and out[1] is g[1] and out[2] is g[2]
    out, clipped, _ = defences.bound_norms(g, 2.5)  # limit 5: a norm equal to the limit is not clipped
    assert clipped == {} and out[0] is g[0]
    assert defences.bound_norms(g[:1], 2.0)[1] == {} and math.isnan(defences.bound_norms(g, 0)[2])
    two = [np.array([0.0, 0.5], np.float32), np.array([0.0, 3.0], np.float32)]  # two clients: the smaller is the
    out, clipped, ref = defences.bound_norms(two, 2.0)  # reference (0.5, below 1), the larger is cut to 1.0
    assert ref == 0.5 and clipped == {1: 3.0} and np.allclose(out[1], [0.0, 1.0])
    zeros = [np.zeros(2, np.float32)] * 2 + [np.ones(2, np.float32)]
    assert defences.bound_norms(zeros, 2.0)[1] == {}  # a zero median norm is no reference
    clipped_all = defences.clip_to_median(g)
    assert [round(float(np.linalg.norm(x)), 5) for x in clipped_all] == [2.0, 1.0, 2.0]
    assert defences.clip_to_median(g[:1])[0] is g[0]
    assert np.allclose(defences.clip_to_median(two)[1], [0.0, 0.5])  # two clients: both at most the smaller norm
    assert defences.extreme_norms(g, 1, [0, 1, 2]) == [0, 1] and defences.extreme_norms(g, 0, [0, 1, 2]) == []
    tie = [np.ones(2, np.float32)] * 3
    assert defences.extreme_norms(tie, 1, [5, 3, 9]) == [1, 2]  # ties broken by the partition order


def test_check_reply_limits_are_strict_and_zero_disables(identity):
    s = _strategy()
    (sent,) = _sent(s, 1, [0])
    ok = _reply(sent, [1e6, 0, 0, 0]).content
    g, loss = defences.check_reply(ok, 2, 2, 1e6)  # exactly the limit is allowed
    assert g.shape == (2, 2) and loss == 1.0
    with pytest.raises(ValueError, match="exceeds federation.max_abs_grad=1e\\+06"):
        defences.check_reply(_reply(sent, [-1.5e6, 0, 0, 0]).content, 2, 2, 1e6)
    assert defences.check_reply(_reply(sent, [1e30, 0, 0, 0]).content, 2, 2, 0)[0][0, 0] == np.float32(1e30)
    scaled = defences.scale_to(np.array([3.0, 4.0], np.float32), 5.0, 1.0)
    assert scaled.dtype == np.float32 and np.allclose(scaled, [0.6, 0.8])


def test_apply_coefficients_over_more_seeds_than_one_chunk():
    """130 seeds: three chunks of directions; the result is the plain sum, whatever the chunking."""
    seeds, coefs = list(range(130)), np.linspace(-1, 1, 130).astype(np.float32)
    b = torch.randn(50, generator=torch.Generator().manual_seed(3))
    z = rng.directions(seeds, 50).double()
    want = b.double() - 0.5 * (torch.from_numpy(coefs).double()[:, None] * z).sum(0)
    assert float((apply_coefficients(b, seeds, coefs, 0.5, "gaussian").double() - want).abs().max()) < 1e-5
    assert torch.equal(apply_coefficients(b, [], [], 0.5, "gaussian"), b)
