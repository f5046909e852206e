import math

import pytest
import torch
from conftest import small_llama

from fedprge.engine import rng
from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.backend import EagerBackend, backend_step
from fedprge.engine.backprop import BackpropTrainer
from fedprge.engine.estimator import (
    StepRecord,
    ZOConfig,
    clip_rms,
    estimate_gradient,
    prge_step,
    replay,
    sequential_step,
)


def make_backend(dtype=torch.float32, rank=4, targets=("q_proj", "v_proj")):
    model = small_llama(dtype=dtype)
    return EagerBackend(model, LoRAFA(model, LoRAConfig(rank=rank, target_modules=targets)))


@pytest.mark.parametrize("q", [1, 2, 4, 8])
def test_batched_step_equals_sequential_reference(q, batch):
    # float64 isolates the algorithm from float32 rounding of differently shaped matmuls
    backend = make_backend(torch.float64)
    b0 = torch.randn(backend.num_params, generator=torch.Generator().manual_seed(q)) * 0.05
    cfg = ZOConfig(q=q, eps=1e-3, lr=1e-2)
    seeds = [rng.derive_seed(1, q, i) for i in range(q)]
    loss = lambda reps: backend.losses(reps.double(), batch)  # noqa: E731
    b_par, rec_par = prge_step(loss, b0, seeds, cfg)
    b_seq, rec_seq = sequential_step(loss, b0, seeds, cfg)
    assert rec_par.seeds == rec_seq.seeds == tuple(seeds)
    torch.testing.assert_close(
        torch.tensor(rec_par.projected_grads), torch.tensor(rec_seq.projected_grads), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(b_par, b_seq, rtol=0, atol=1e-7)
    assert not torch.equal(b_par, b0)


def test_batched_step_matches_sequential_in_float32(batch):
    backend = make_backend(torch.float32)
    b0 = torch.zeros(backend.num_params)
    cfg = ZOConfig(q=4, eps=1e-2, lr=1e-2)
    loss = lambda reps: backend.losses(reps, batch)  # noqa: E731
    _, rec_par = prge_step(loss, b0, [1, 2, 3, 4], cfg)
    _, rec_seq = sequential_step(loss, b0, [1, 2, 3, 4], cfg)
    # float32 losses (~6.2) carry ~1e-6 rounding, which eps=1e-2 scales by 50
    torch.testing.assert_close(
        torch.tensor(rec_par.projected_grads), torch.tensor(rec_seq.projected_grads), rtol=0, atol=2e-4
    )


def test_backend_step_is_the_prge_step_of_the_backend_losses(batch):
    backend = make_backend()
    b0 = 0.05 * rng.directions([5], backend.num_params)[0]
    cfg, seeds = ZOConfig(q=3, eps=1e-2, lr=5e-2), [rng.derive_seed(4, i) for i in range(3)]
    b, rec, losses = backend_step(backend, b0, batch, seeds, cfg)
    want_b, want_rec = prge_step(lambda r: backend.losses(r, batch), b0, seeds, cfg)
    assert torch.equal(b, want_b) and rec == want_rec and losses.shape == (6,)
    z = rng.directions(seeds, backend.num_params)
    assert torch.equal(losses[:3], backend.losses(b0 + cfg.eps * z, batch))  # +eps first, -eps last
    assert torch.equal(losses[3:], backend.losses(b0 - cfg.eps * z, batch))


def test_replay_reproduces_a_trajectory_bit_for_bit(batch):
    backend = make_backend()
    cfg = ZOConfig(q=3, eps=1e-2, lr=5e-2)
    b = backend_b0 = torch.zeros(backend.num_params)
    records = []
    for step in range(5):
        b, rec = prge_step(lambda r: backend.losses(r, batch), b, [rng.derive_seed(9, step, i) for i in range(3)], cfg)
        records.append(rec)
    assert torch.equal(replay(backend_b0, records, cfg.lr, cfg.distribution), b)


def test_estimator_converges_to_the_true_gradient(batch):
    """E[g z] = grad for small eps and E[z z^T] = I. For Gaussian z the expected squared cosine between the
    average of n estimates and the gradient is about n / (n + P + 1). With P = 128 adapter entries,
    n = 8P = 1024 predicts 0.94, so 0.9 is reached there; n = 16 predicts 0.33."""
    backend = make_backend(torch.float64, rank=1, targets=("q_proj",))
    P = backend.num_params
    assert P == 128
    b = torch.randn(P, generator=torch.Generator().manual_seed(0)) * 0.3
    true = BackpropTrainer(backend, b.double(), lr=1.0).gradient(batch).float()
    cfg = ZOConfig(q=16, eps=1e-4)
    loss = lambda reps: backend.losses(reps.double(), batch)  # noqa: E731
    est, cosines = torch.zeros(P), {}
    for k in range(64):  # 64 steps of 16 directions
        est += estimate_gradient(loss, b, [rng.derive_seed(3, k, i) for i in range(16)], cfg)
        n = 16 * (k + 1)
        if n in (16, 128, 1024):
            cosines[n] = torch.nn.functional.cosine_similarity(est, true, dim=0).item()
    assert cosines[16] < cosines[128] < cosines[1024]
    assert cosines[1024] > 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q": 0}, "q=0"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"eps": -1e-3}, "eps=-0.001"),
        ({"lr": 0}, "lr=0"),
        ({"distribution": "normal"}, "'normal'"),
        ({"clip": -1.0}, "clip=-1.0"),
        ({"clip": float("inf")}, "clip=inf"),
    ],
)
def test_bad_zo_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOConfig(**kwargs)


def test_replay_rejects_mismatched_records():
    with pytest.raises(ValueError, match="2 seeds but 1"):
        replay(torch.zeros(10), [StepRecord((1, 2), (0.5,))], 1e-3, "gaussian")


def test_estimate_on_a_linear_loss_is_the_mean_of_exact_directional_derivatives():
    """For L(b) = c.b the central difference is exact: g_i = c.z_i, so the estimate is (1/q) sum_i (c.z_i) z_i, with
    its scale (a wrong eps factor changes it by orders of magnitude; float32 noise is ~1e-6 relative)."""
    c = torch.linspace(-1, 1, 40, dtype=torch.float64)
    seeds = [3, 4, 5]
    est = estimate_gradient(lambda reps: reps.double() @ c, torch.zeros(40), seeds, ZOConfig(q=3, eps=1e-2))
    z = rng.directions(seeds, 40).double()
    want = ((z @ c)[:, None] * z).mean(0)
    assert torch.allclose(est.double(), want, rtol=1e-4, atol=1e-5)


def test_clip_rms_scales_a_step_down_to_the_bound_exactly():
    g = torch.tensor([3.0, 4.0, 0.0, 0.0])  # rms 2.5
    assert torch.allclose(clip_rms(g, 0.5), torch.tensor([0.6, 0.8, 0.0, 0.0]))  # a bound below 1 as well
    assert torch.equal(clip_rms(g, 2.5), g) and torch.equal(clip_rms(g, 0.0), g)  # at the bound, and off
    assert float(clip_rms(g * 10, 2.5).pow(2).mean().sqrt()) == pytest.approx(2.5)


def test_clip_rms_scale_is_computed_in_float64_the_same_on_every_cpu():
    # torch's float32 sqrt is off by an ulp for ~20% of inputs on AVX-512 (this g: 4.3077407 instead of 4.3077402);
    # the scale must be the correctly rounded float64 one, which the native client and any CPU reproduce
    g = torch.tensor([0.20635128021240234, 3.2206058502197266, -1.9405126571655273, 7.748937606811523])
    rms = math.sqrt(sum(x * x for x in g.double().tolist()) / 4)
    assert torch.equal(clip_rms(g, 2.0), g * torch.tensor(2.0 / rms, dtype=torch.float32))
    assert clip_rms(g, 2.0)[1].item() == 1.4952646493911743  # the native client's bits for this step
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        g = torch.randn(4, generator=rng) * 10
        rms = math.sqrt(sum(x * x for x in g.double().tolist()) / 4)
        want = g * torch.tensor(2.0 / rms, dtype=torch.float32) if rms > 2.0 else g
        assert torch.equal(clip_rms(g, 2.0), want)
