"""The exportable P-RGE step: directions generated from seeds inside the program, then 2q losses in one forward.

Inputs and outputs are plain tensors with static shapes, so :func:`torch.export.export` captures the whole step;
the directions use exactly the integer ops of :mod:`fedprge.engine.rng` (no random op), so a program's z equals
the host's ``rng.directions`` bit for bit.

:class:`NLLProgram` is the evaluation method of the same .pte: per-example NLL of one state b.
"""

from __future__ import annotations

import torch
from torch import nn

from fedprge.checks import check_range
from fedprge.data.encode import IGNORE_INDEX
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAFA
from fedprge.engine.backend import head_nll
from fedprge.engine.estimator import perturbed_replicas


def token_nll(
    model: nn.Module,
    lora: LoRAFA,
    reps: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """NLL of every next token under each row of ``reps`` (dup, P) -> (dup, bs, T - 1), 0 where unlabelled.

    The eager backend's :func:`~fedprge.engine.backend.head_nll`, run on every position instead of the labelled
    ones only (a selection of labelled rows has a data-dependent shape); unlabelled positions are masked out.
    """
    dup = reps.shape[0]
    targets = labels[:, 1:]
    with lora.use(reps):
        hidden = model.base_model(
            input_ids=input_ids.repeat(dup, 1), attention_mask=attention_mask.repeat(dup, 1)
        ).last_hidden_state
        rows = hidden[:, :-1].reshape(dup, -1, hidden.shape[-1])  # replica-major
        nll = head_nll(model.get_output_embeddings(), rows, targets.reshape(-1).clamp(min=0))
    nll = nll.reshape(dup, *targets.shape)
    return torch.where(targets != IGNORE_INDEX, nll, torch.zeros_like(nll))


class DirectionsProgram(nn.Module):
    """``seeds (q,) int64 -> z (q, P) float32``, as :func:`fedprge.engine.rng.directions` computes it."""

    def __init__(self, num_params: int, distribution: str = "gaussian") -> None:
        super().__init__()
        rng.check_distribution(distribution)
        self.num_params = num_params
        self.distribution = distribution
        table = rng.gaussian_table() if distribution == "gaussian" else torch.zeros(1)
        self.register_buffer("table", table.clone())

    def forward(self, seeds: torch.Tensor) -> torch.Tensor:
        return rng.directions_from_bits(rng.bits(seeds, self.num_params), self.distribution, self.table)


class PRGEProgram(nn.Module):
    """``(input_ids, attention_mask, labels, seeds, b) -> (2q,)`` mean-token losses of ``b +/- eps z_i``.

    The order is :func:`~fedprge.engine.estimator.perturbed_replicas`' (rows 0..q-1 plus, q..2q-1 minus) and the
    loss is :class:`~fedprge.engine.backend.EagerBackend`'s: summed NLL of the labelled next tokens (labels
    shifted by one, -100 ignored) over the number of labelled tokens (:func:`token_nll`).
    """

    def __init__(self, model: nn.Module, lora: LoRAFA, q: int, eps: float, distribution: str = "gaussian") -> None:
        super().__init__()
        check_range("q", q, "[1, inf)", integer=True, note="the number of directions")
        check_range("eps", eps, "(0, inf)", note="the perturbation size")
        self.model = model
        self.lora = lora
        self.q = q
        self.eps = float(eps)
        self.num_params = lora.num_params
        self.directions = DirectionsProgram(lora.num_params, distribution)

    def losses(
        self, reps: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean-token NLL of the batch under each row of ``reps`` (dup, P) -> (dup,)."""
        nll = token_nll(self.model, self.lora, reps, input_ids, attention_mask, labels)
        return nll.flatten(1).sum(1) / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        seeds: torch.Tensor,
        b: torch.Tensor,
    ) -> torch.Tensor:
        z = self.directions(seeds)
        return self.losses(perturbed_replicas(b, z, self.eps), input_ids, attention_mask, labels)


class NLLProgram(nn.Module):
    """``(input_ids, attention_mask, labels, b) -> (sums (bs,) float32, counts (bs,) int64)`` for one state b.

    Per-example summed NLL of the labelled next tokens and their number, as
    :meth:`~fedprge.engine.backend.EagerBackend.example_nll` returns them: held-out evaluation on the device.
    """

    def __init__(self, model: nn.Module, lora: LoRAFA) -> None:
        super().__init__()
        self.model = model
        self.lora = lora

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nll = token_nll(self.model, self.lora, b.unsqueeze(0), input_ids, attention_mask, labels)[0]
        return nll.sum(1), (labels[:, 1:] != IGNORE_INDEX).sum(1)
