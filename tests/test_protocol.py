import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedprge.engine import rng
from fedprge.engine.estimator import StepRecord, apply_update, replay
from fedprge.engine.seeds import SeedSpec, step_seeds
from fedprge.federation.protocol import GlobalState, RoundUpdate, apply_coefficients, decode_grads, pack_f32


def test_global_state_round_trips_in_every_form():
    b = torch.randn(50)
    w = GlobalState.from_record("weights", GlobalState("weights", b=b).to_record())
    assert torch.equal(w.b, b)
    ups = [
        RoundUpdate(2, [1, 2**32 - 1], np.array([0.5, -1.25], np.float32)),
        RoundUpdate(3, [7], np.array([2.0], np.float32)),
    ]
    s = GlobalState.from_record("seeds", GlobalState("seeds", updates=ups).to_record())
    assert [(u.rnd, u.seeds, u.coefs.tolist()) for u in s.updates] == [(u.rnd, u.seeds, u.coefs.tolist()) for u in ups]
    c = np.arange(8, dtype=np.float32)
    p = GlobalState.from_record("pool", GlobalState("pool", pool_coefs=c).to_record())
    assert np.array_equal(p.pool_coefs, c)


def test_inconsistent_seed_update_is_rejected():
    rec = GlobalState("seeds", updates=[RoundUpdate(1, [1, 2], np.array([1.0, 2.0], np.float32))]).to_record()
    rec["coefs"] = pack_f32([1.0])
    with pytest.raises(ValueError, match="inconsistent seed update"):
        GlobalState.from_record("seeds", rec)
    with pytest.raises(ValueError, match="unknown downlink kind 'dense'"):
        GlobalState.from_record("dense", rec)


def test_decode_grads_checks_the_count():
    rec = ConfigRecord({"projected_grads": pack_f32(np.zeros(12))})
    assert decode_grads(rec, 3, 4).shape == (3, 4)
    with pytest.raises(ValueError, match="12 projected gradients; expected local_steps\\*q = 8"):
        decode_grads(rec, 2, 4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        decode_grads(ConfigRecord({"projected_grads": b"abc"}), 1, 1)


def test_aggregated_coefficients_replay_equals_step_updates():
    b = torch.randn(300, generator=torch.Generator().manual_seed(0))
    seeds, g = [11, 12, 13], torch.tensor([0.3, -2.0, 1.5])
    z = rng.directions(seeds, 300)
    assert torch.equal(apply_update(b, z, g, 0.1), apply_coefficients(b, seeds, g.numpy(), 0.1 / 3, "gaussian"))
    # the update written out in float64: b - lr/q * sum_i g_i z_i (a step moves b by ~0.1 per entry, the float32
    # rounding of the accumulation is ~1e-7)
    want = b.double() - 0.1 / 3 * (g.double()[:, None] * z.double()).sum(0)
    assert float((apply_update(b, z, g, 0.1).double() - want).abs().max()) < 1e-6


def test_weighted_average_of_client_replays_is_one_seed_list():
    """The README's linearity claim: the weighted mean of two clients' replayed trajectories (two steps each, own
    seeds) is b - lr/q * sum of the weighted scalars times their directions, i.e. one seed/coefficient list. The
    clients' updates differ by ~0.1 per entry; float32 accumulation differs by ~1e-7."""
    b, lr, w = torch.randn(400, generator=torch.Generator().manual_seed(1)), 0.05, (0.25, 0.75)
    steps = {
        0: [StepRecord((1, 2), (0.5, -1.0)), StepRecord((3, 4), (2.0, 0.25))],
        1: [StepRecord((5, 6), (-0.75, 1.5)), StepRecord((7, 8), (1.0, -3.0))],
    }
    trajectories = [replay(b, steps[c], lr, "gaussian") for c in (0, 1)]
    mean = w[0] * trajectories[0].double() + w[1] * trajectories[1].double()
    seeds = [s for c in (0, 1) for rec in steps[c] for s in rec.seeds]
    coefs = [w[c] * g for c in (0, 1) for rec in steps[c] for g in rec.projected_grads]
    merged = apply_coefficients(b, seeds, coefs, lr / 2, "gaussian")
    assert float((merged.double() - mean).abs().max()) < 1e-5
    assert float((trajectories[0] - trajectories[1]).abs().max()) > 0.05  # the clients really differ
    with pytest.raises(ValueError, match="2 seeds but 1 projected grads"):
        replay(b, [StepRecord((1, 2), (0.5,))], lr, "gaussian")


def test_seed_scopes_and_pool():
    client = SeedSpec(run_seed=1, q=4, scope="client")
    shared = SeedSpec(run_seed=1, q=4, scope="round")
    pool = SeedSpec(run_seed=1, q=4, scope="client", pool_size=8)
    assert step_seeds(client, 1, 0, 0) != step_seeds(client, 1, 1, 0)
    assert step_seeds(shared, 1, 0, 0) == step_seeds(shared, 1, 1, 0)
    assert step_seeds(client, 1, 0, 0) != step_seeds(client, 2, 0, 0)
    drawn = {s for p in range(5) for t in range(10) for s in step_seeds(pool, 3, p, t)}
    assert drawn <= set(pool.pool()) and len(pool.pool()) == 8


def test_a_workers_clients_share_one_catch_up_replay_and_get_the_plain_replays_bits():
    """Clients a worker runs that last synced at the same round replay the same updates from the same B: the memo
    (``client_app.replay_round``) computes each round's result once, and every client gets B bit for bit as its own
    plain :func:`catch_up` would."""
    from fedprge.config import load_config
    from fedprge.federation.client_app import replay_round
    from fedprge.federation.updates import catch_up
    from fedprge.task import Task

    task = Task(load_config(["configs/smoke.yaml"]))
    gen = torch.Generator().manual_seed(0)
    ups = [RoundUpdate(r, [100 * r + k for k in range(5)], torch.randn(5, generator=gen).numpy()) for r in (1, 2, 3)]
    zero = torch.zeros(task.num_params)
    memo = lambda b, upd: replay_round(task, b, upd)  # noqa: E731
    plain_1, _ = catch_up(zero, 0, ups[:1], task.zo)
    plain_3, synced = catch_up(zero, 0, ups, task.zo)
    assert synced == 3 and not torch.equal(plain_1, plain_3)
    assert torch.equal(catch_up(zero, 0, ups, task.zo, memo)[0], plain_3)  # a client that never trained
    assert len(task._states) == 3
    assert torch.equal(catch_up(plain_1, 1, ups, task.zo, memo)[0], plain_3)  # one synced at round 1: no new replay
    assert len(task._states) == 3
    other = RoundUpdate(3, ups[2].seeds, ups[2].coefs * 2)  # another update of round 3: replayed, not mixed up
    assert not torch.equal(catch_up(zero, 0, [*ups[:2], other], task.zo, memo)[0], plain_3)
    assert len(task._states) == 4
