"""The exportable P-RGE step: directions generated from seeds inside the program, then 2q losses in one forward.

Inputs and outputs are plain tensors with static shapes, so :func:`torch.export.export` captures the whole step;
the directions use exactly the integer ops of :mod:`fedprge.engine.rng` (no random op), so a program's z equals
the host's ``rng.directions`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from fedprge.data.encode import IGNORE_INDEX
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAFA
from fedprge.engine.estimator import perturbed_replicas


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
    shifted by one, -100 ignored) over the number of labelled tokens. The LM head runs on every position (a
    selection of labelled rows has a data-dependent shape); unlabelled ones are masked out of the sum.
    """

    def __init__(self, model: nn.Module, lora: LoRAFA, q: int, eps: float, distribution: str = "gaussian") -> None:
        super().__init__()
        if not isinstance(q, int) or isinstance(q, bool) or q < 1:
            raise ValueError(f"q={q!r} is invalid; the number of directions must be an integer >= 1")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps={eps!r} is invalid; the perturbation size must be > 0")
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
        dup = reps.shape[0]
        with self.lora.use(reps):
            hidden = self.model.base_model(
                input_ids=input_ids.repeat(dup, 1), attention_mask=attention_mask.repeat(dup, 1)
            ).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1]).float()
        targets = labels[:, 1:].repeat(dup, 1)
        labelled = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = torch.where(labelled, nll, torch.zeros_like(nll)).reshape(dup, -1).sum(1)
        return sums / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)

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
