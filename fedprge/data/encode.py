"""Turning examples into padded tensors for a causal LM, and drawing minibatches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedprge.checks import check_range
from fedprge.data.types import Example

IGNORE_INDEX = -100


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode(tokenizer, examples: Sequence[Example], max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (int64, shape ``(len(examples), L)``).

    Prompt and target are tokenised separately without special tokens and concatenated, so the labelled
    positions are exactly the target's tokens; prompt tokens and padding get label -100. Over ``max_len`` the
    prompt loses tokens from the left first; a target longer than ``max_len`` keeps its first tokens. ``L`` is
    the longest encoded example. Padding uses the pad token, or EOS if the tokenizer has none.
    """
    if not examples:
        raise ValueError("encode needs at least one example")
    check_range("max_len", max_len, "[1, inf)", integer=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    rows: list[tuple[list[int], int]] = []
    for ex in examples:
        prompt, target = _ids(tokenizer, ex.prompt), _ids(tokenizer, ex.target)[:max_len]
        prompt = prompt[len(prompt) - (max_len - len(target)) :] if len(prompt) + len(target) > max_len else prompt
        rows.append((prompt + target, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels[i, n_prompt : len(ids)] = input_ids[i, n_prompt : len(ids)]
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sample_indices(n: int, batch_size: int, seed: int) -> list[int]:
    """``batch_size`` indices into ``range(n)``, a pure function of ``seed``.

    Without replacement; with replacement only when ``n < batch_size``.
    """
    check_range("n", n, "[1, inf)", integer=True, note="the number of examples to sample from")
    check_range("batch_size", batch_size, "[1, inf)", integer=True)
    rng = np.random.default_rng(seed)
    return rng.choice(n, size=batch_size, replace=n < batch_size).tolist()
