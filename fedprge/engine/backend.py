"""Backends evaluate losses of B replicas; a client talks to this interface, never to a model class.

``EagerBackend`` runs a PyTorch/transformers model with :class:`~fedprge.engine.adapters.LoRAFA` adapters. The
ExecuTorch backend (:class:`fedprge.export.backend.PTEBackend`) runs a .pte program: its ``example_nll`` is the
program's ``nll`` method, and instead of ``losses`` of B replicas it has ``perturbed_losses(seeds, b, batch)``,
since the program draws the directions itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedprge.engine.adapters import LoRAFA
from fedprge.engine.shared_base import PRECISIONS, SharedBase

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (bs, T) int64


class Backend(Protocol):
    num_params: int

    def losses(self, b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean token NLL of ``batch`` under each replica of ``b`` (dup, P) -> (dup,), in ONE forward."""
        ...

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed NLL over target tokens and the number of target tokens, for state ``b`` (P,)."""
        ...


class EagerBackend:
    """A causal LM with LoRA-FA adapters, evaluated in eager PyTorch.

    The batch is repeated ``dup`` times (outer loop: q directions; inner loop: +eps/-eps) and replica k sees
    B_k. The LM head and the loss are computed only at positions that carry a label, in chunks, so the
    vocabulary-sized logits never exist for the whole enlarged batch at once. ``precision='shared-bf16'`` runs
    the frozen matmuls of a multi-replica forward in bf16 around a shared base (:mod:`~fedprge.engine.shared_base`).
    """

    def __init__(self, model: nn.Module, lora: LoRAFA, chunk_rows: int = 128, precision: str = "float32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid; choose one of {PRECISIONS}")
        self.model = model
        self.lora = lora
        self.num_params = lora.num_params
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.shared = SharedBase(model) if precision == "shared-bf16" else None
        self.trunk = model.base_model  # the decoder without the LM head (e.g. LlamaModel)
        self.head = model.get_output_embeddings()

    def _nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per (replica, example) -> (dup, bs), and target-token counts per example (bs,)."""
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
            step = max(1, self.chunk_rows // dup)  # label positions per chunk, for all replicas at once
            nll = torch.cat(
                [
                    F.cross_entropy(
                        self.head(rows[:, i : i + step]).float().flatten(0, 1),
                        tgt[i : i + step].repeat(dup),
                        reduction="none",
                    ).reshape(dup, -1)
                    for i in range(0, rows.shape[1], step)
                ]
                or [rows.new_zeros(dup, 0, dtype=torch.float32)],
                dim=1,
            )
        sums = torch.zeros(dup, bs, dtype=torch.float32).index_add_(1, owner, nll)
        return sums, sel.sum(1)

    def _replicas(self, dup: int) -> AbstractContextManager:
        return self.shared.replicas(dup) if self.shared is not None else nullcontext()

    def losses(self, b: torch.Tensor, batch: Batch) -> torch.Tensor:
        sums, counts = self._nll(b, batch)
        return sums.sum(1) / counts.sum().clamp(min=1)

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sums, counts = self._nll(b.reshape(1, -1), batch)
        return sums[0], counts
