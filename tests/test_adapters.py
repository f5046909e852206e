import pytest
import torch
from conftest import random_batch, small_llama

from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.backend import EagerBackend


def test_zero_B_leaves_the_model_unchanged(batch):
    ref = small_llama()
    model = small_llama()
    lora = LoRAFA(model, LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj")))
    assert len(lora.layers) == 6 and lora.num_params == 2 * (64 * 4 + 32 * 4 + 64 * 4)
    with lora.use(lora.zeros()):
        out = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(out, ref(input_ids=batch["input_ids"]).logits)


def test_replica_k_sees_its_own_B(batch):
    model = small_llama()
    backend = EagerBackend(model, LoRAFA(model, LoRAConfig(rank=2)))
    reps = torch.randn(3, backend.num_params, generator=torch.Generator().manual_seed(0)) * 0.5
    together = backend.losses(reps, batch)
    alone = torch.stack([backend.losses(reps[k : k + 1], batch)[0] for k in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert together.unique().numel() == 3  # different B, different loss


def test_A_is_fixed_by_its_seed_and_B_moves_the_output(batch):
    m1, m2, m3 = small_llama(), small_llama(), small_llama()
    l1 = LoRAFA(m1, LoRAConfig(a_seed=3))
    l2 = LoRAFA(m2, LoRAConfig(a_seed=3))
    l3 = LoRAFA(m3, LoRAConfig(a_seed=4))
    assert all(torch.equal(a.A, b.A) for a, b in zip(l1.layers, l2.layers, strict=True))
    assert not torch.equal(l1.layers[0].A, l3.layers[0].A)
    b = torch.full((l1.num_params,), 0.1)
    with l1.use(b):
        moved = m1(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(moved, m2(input_ids=batch["input_ids"]).logits)


def test_example_nll_counts_only_target_tokens():
    model = small_llama()
    backend = EagerBackend(model, LoRAFA(model, LoRAConfig()))
    batch = random_batch(bs=2, seq=10)
    sums, counts = backend.example_nll(torch.zeros(backend.num_params), batch)
    assert counts.tolist() == [(batch["labels"][i, 1:] != -100).sum().item() for i in range(2)]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="sum")
    torch.testing.assert_close(sums[0], ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank=0.*>= 1"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"alpha": 0}, "alpha=0.*> 0"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules='q_proj'"),
        ({"a_seed": -1}, "a_seed=-1"),
    ],
)
def test_bad_config_is_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_missing_target_module_names_it_and_the_alternatives():
    with pytest.raises(ValueError, match=r"'qkv_proj'.*available: \[.*'q_proj'"):
        LoRAFA(small_llama(), LoRAConfig(target_modules=("q_proj", "qkv_proj")))
