"""Backends compute the P-RGE losses and held-out NLL of a state B; a client talks to this interface only.

``EagerBackend`` runs a PyTorch/transformers model with :class:`~fedprge.engine.adapters.LoRAFA` adapters; the
ExecuTorch backend (:class:`fedprge.export.backend.PTEBackend`) runs a .pte program that draws the directions
itself. Both take seeds, never directions: z is a pure function of the seeds (:mod:`~fedprge.engine.rng`), so
every backend and the host agree on it bit for bit. :func:`head_nll` is the one token NLL of both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from fedprge.engine import rng
from fedprge.engine.adapters import LoRAFA
from fedprge.engine.estimator import StepRecord, ZOConfig, finish_step, perturbed_replicas
from fedprge.engine.shared_base import PRECISIONS, SharedBase

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (bs, T) int64

HEAD_CHUNK_ROWS = 128  # LM-head rows per slice: the vocabulary-sized logits exist for one slice at a time


class Backend(Protocol):
    num_params: int
    per_token: bool  # whether token_nll is available (an exported .pte's nll gives per-example sums only)

    def perturbed_losses(
        self, b: torch.Tensor, batch: Batch, seeds: Sequence[int], zo: ZOConfig, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(2q,) mean token NLL of ``batch`` under b + eps z_i (first q) and b - eps z_i (last q), z_i the direction
        of ``seeds[i]``: the order :func:`~fedprge.engine.estimator.finish_step` expects. One batched evaluation.
        ``z``: those directions when the caller has drawn them already (a program draws its own from the seeds)."""
        ...

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed NLL over target tokens and the number of target tokens, for state ``b`` (P,)."""
        ...

    def token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The NLL of every target token of ``batch`` under ``b`` (P,), and the target token ids: (n,), (n,)."""
        ...


def backend_step(
    backend: Backend,
    b: torch.Tensor,
    batch: Batch,
    seeds: Sequence[int],
    zo: ZOConfig,
    privatize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, StepRecord, torch.Tensor]:
    """One P-RGE step on any backend: ``(new b, StepRecord, the 2q losses)``. The backend evaluates the perturbed
    losses from the seeds, the host draws the same z and :func:`~fedprge.engine.estimator.finish_step` does the rest.
    """
    z = rng.directions(seeds, b.numel(), zo.distribution)  # drawn once: the eager forward and the update share it
    losses = backend.perturbed_losses(b, batch, seeds, zo, z)
    new_b, rec = finish_step(b, z, seeds, losses, zo, privatize)
    return new_b, rec, losses


def head_nll(
    head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, chunk_rows: int = HEAD_CHUNK_ROWS
) -> torch.Tensor:
    """NLL of ``targets`` (n,), ids >= 0, under the LM ``head`` at hidden states ``rows`` (dup, n, H) -> (dup, n).

    The head runs on ``chunk_rows // dup`` positions of every replica at a time, so the (positions x vocabulary)
    logits never exist for the whole enlarged batch. The slices have static shapes: torch.export traces this too,
    and ExecuTorch's memory planner gives all slices one buffer.
    """
    dup, n = rows.shape[:2]
    step = max(1, chunk_rows // dup)
    parts = []
    for i in range(0, n, step):
        logp = torch.log_softmax(head(rows[:, i : i + step]).float().flatten(0, 1), dim=-1)
        parts.append(-logp.gather(1, targets[i : i + step].repeat(dup).unsqueeze(1)).reshape(dup, -1))
    return torch.cat(parts, dim=1) if parts else rows.new_zeros(dup, 0, dtype=torch.float32)


class EagerBackend:
    """A causal LM with LoRA-FA adapters, evaluated in eager PyTorch.

    The batch is repeated ``dup`` times (outer loop: q directions; inner loop: +eps/-eps) and replica k sees
    B_k. The LM head and the loss (:func:`head_nll`) are computed only at positions that carry a label.
    ``precision='shared-bf16'`` runs the frozen matmuls of a multi-replica forward in bf16 around a shared base
    (:mod:`~fedprge.engine.shared_base`).
    """

    def __init__(
        self, model: nn.Module, lora: LoRAFA, chunk_rows: int = HEAD_CHUNK_ROWS, precision: str = "float32"
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid; choose one of {PRECISIONS}")
        self.model = model
        self.lora = lora
        self.num_params = lora.num_params
        self.per_token = True
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.shared = SharedBase(model) if precision == "shared-bf16" else None
        self.trunk = model.base_model  # the decoder without the LM head (e.g. LlamaModel)
        self.head = model.get_output_embeddings()

    def _token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NLL of every target token per replica (dup, n), the target ids (n,) and their examples (n,)."""
        b = b if b.dim() == 2 else b.unsqueeze(0)
        dup, (bs, _) = b.shape[0], batch["input_ids"].shape
        ids = batch["input_ids"].repeat(dup, 1)
        mask = batch["attention_mask"].repeat(dup, 1)
        targets = batch["labels"][:, 1:]
        sel = targets != -100  # the same positions in every replica
        tgt = targets[sel]
        owner = torch.arange(bs).unsqueeze(1).expand_as(targets)[sel]
        with self.lora.use(b), self._replicas(dup):
            hidden = self.trunk(input_ids=ids, attention_mask=mask).last_hidden_state
            rows = hidden[:, :-1][sel.repeat(dup, 1)].reshape(dup, -1, hidden.shape[-1])  # replica-major
            nll = head_nll(self.head, rows, tgt, self.chunk_rows)
        return nll, tgt, owner

    def _nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per (replica, example) -> (dup, bs), and target-token counts per example (bs,)."""
        nll, _, owner = self._token_nll(b, batch)
        sums = torch.zeros(nll.shape[0], batch["input_ids"].shape[0], dtype=torch.float32).index_add_(1, owner, nll)
        return sums, (batch["labels"][:, 1:] != -100).sum(1)

    def _replicas(self, dup: int) -> AbstractContextManager:
        return self.shared.replicas(dup) if self.shared is not None else nullcontext()

    def losses(self, b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean token NLL of ``batch`` under each replica of ``b`` (dup, P) -> (dup,), in ONE forward (with autograd,
        for the first-order baselines)."""
        sums, counts = self._nll(b, batch)
        return sums.sum(1) / counts.sum().clamp(min=1)

    def perturbed_losses(
        self, b: torch.Tensor, batch: Batch, seeds: Sequence[int], zo: ZOConfig, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The 2q replicas b +/- eps z_i of :func:`~fedprge.engine.estimator.perturbed_replicas`, in one forward."""
        z = rng.directions(seeds, b.numel(), zo.distribution) if z is None else z
        with torch.no_grad():
            return self.losses(perturbed_replicas(b, z, zo.eps), batch)

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sums, counts = self._nll(b.reshape(1, -1), batch)
        return sums[0], counts

    def token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            nll, tgt, _ = self._token_nll(b.reshape(1, -1), batch)
        return nll[0], tgt
