"""Cross-client batching: K clients' P-RGE steps in one forward give what K separate steps give."""

import pytest
import torch
from conftest import random_batch, small_llama

from fedprge.engine import rng
from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.backend import EagerBackend, backend_step, backend_steps
from fedprge.engine.estimator import ZOConfig, replay


def clients(num_params: int, widths: list[int]) -> tuple[list, list, list]:
    """Per client: its own state, its own batch (of its own width) and its own seeds."""
    bs = [1e-2 * rng.directions([100 + k], num_params)[0] for k in range(len(widths))]
    batches = [random_batch(bs=2, seq=w, seed=k) for k, w in enumerate(widths)]
    seeds = [[rng.derive_seed(7, k, i) for i in range(4)] for k in range(len(widths))]
    return bs, batches, seeds


@pytest.mark.parametrize("precision", ["float32", "shared-bf16"])
def test_batched_clients_match_clients_one_by_one(precision):
    model = small_llama(hidden=128, layers=3)
    be = EagerBackend(model, LoRAFA(model, LoRAConfig(rank=4)), precision=precision)
    zo = ZOConfig(q=4, eps=1e-2, lr=1e-2)
    bs, batches, seeds = clients(be.num_params, [16, 11, 16])  # one narrower batch: right-padded in the batch
    together = backend_steps(be, bs, batches, seeds, zo)
    for k, (b, batch, s) in enumerate(zip(bs, batches, seeds, strict=True)):
        alone_b, alone_rec, alone_losses = backend_step(be, b, batch, s, zo)
        new_b, rec, losses = together[k]
        torch.testing.assert_close(losses, alone_losses, rtol=1e-5, atol=1e-5)
        g, g_alone = torch.tensor(rec.projected_grads), torch.tensor(alone_rec.projected_grads)
        assert (g - g_alone).norm() <= 2e-3 * g_alone.norm() + 1e-4, (k, g, g_alone)
        assert rec.seeds == alone_rec.seeds  # each client keeps its own directions
        # the server replays the batched step from the scalars as exactly as any other step
        assert (replay(b, [rec], zo.lr, zo.distribution) - new_b).abs().max() <= 1e-6
    # the clients really differ: the batch did not hand one client's losses to another
    assert not torch.allclose(together[0][2], together[1][2])


def test_unequal_batch_sizes_are_rejected():
    model = small_llama()
    be = EagerBackend(model, LoRAFA(model, LoRAConfig(rank=4)))
    b = torch.zeros(be.num_params)
    batches = [random_batch(bs=2), random_batch(bs=3)]
    with pytest.raises(ValueError, match=r"equal size; got sizes \[2, 3\]"):
        backend_steps(be, [b, b], batches, [[1], [2]], ZOConfig(q=1))


def test_device_settings_are_checked():
    from fedprge.config import load_config

    with pytest.raises(ValueError, match=r"model.device='gpu'.*\('cpu', 'cuda'\)"):
        load_config([], ["model.device=gpu"])
    with pytest.raises(ValueError, match="model.device='cuda'.*algorithm=prge"):
        load_config([], ["model.device=cuda", "federation.algorithm=fedavg_lora_fa"])
    with pytest.raises(ValueError, match="sim.gpus_per_client"):
        load_config([], ["sim.gpus_per_client=-1"])
