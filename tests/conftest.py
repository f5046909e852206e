"""Shared fixtures: small random Llama models (no downloads) and batches."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


def small_llama(vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0, dtype=torch.float32):
    """A random LlamaForCausalLM built in code (fast; for the estimator math, not for language)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval().requires_grad_(False).to(dtype)


def random_batch(vocab: int = 512, bs: int = 3, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss
    labels[-1, seq - 4 :] = -100  # right padding on the last example
    mask = torch.ones_like(ids)
    mask[-1, seq - 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return random_batch()


@pytest.fixture
def identity():
    """Flower stamps run/task/node ids on every Message it builds; outside a run they must be set by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
