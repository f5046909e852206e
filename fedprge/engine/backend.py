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


def backend_steps(
    backend: EagerBackend,
    bs: Sequence[torch.Tensor],
    batches: Sequence[Batch],
    seeds: Sequence[Sequence[int]],
    zo: ZOConfig,
) -> list[tuple[torch.Tensor, StepRecord, torch.Tensor]]:
    """:func:`backend_step` for K clients at once (cross-client batching): the K x 2q perturbed losses in ONE
    forward (:meth:`EagerBackend.perturbed_losses_many`), then each client's own :func:`finish_step`."""
    zs = [rng.directions(s, b.numel(), zo.distribution) for b, s in zip(bs, seeds, strict=True)]
    losses = backend.perturbed_losses_many(bs, batches, zs, zo.eps)
    return [(*finish_step(b, z, s, lk, zo), lk) for b, z, s, lk in zip(bs, zs, seeds, losses, strict=True)]


def check_device(device: str) -> None:
    """A one-line ``ValueError`` when ``device`` is ``cuda`` and torch sees no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device='cuda' is invalid here: torch sees no CUDA device; use model.device=cpu")


def _pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """``x`` (bs, T) right-padded with ``value`` to (bs, width)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def example_sums(nll: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Token NLLs (dup, n), in the order of ``batch``'s target tokens, summed per example -> (dup, bs), and the
    target-token count of each example (bs,)."""
    sel = batch["labels"][:, 1:] != -100
    owner = torch.arange(sel.shape[0]).unsqueeze(1).expand_as(sel)[sel]
    sums = torch.zeros(nll.shape[0], sel.shape[0], dtype=torch.float32).index_add_(1, owner, nll)
    return sums, sel.sum(1)


def _mean_loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per replica (dup,) from per-example sums and counts."""
    return sums.sum(1) / counts.sum().clamp(min=1)


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
    (:mod:`~fedprge.engine.shared_base`). ``device``: where the model runs (``cpu``, ``cuda``); states, seeds,
    directions and updates stay on the host, only the forward's inputs go to the device and its losses come back.
    """

    def __init__(
        self,
        model: nn.Module,
        lora: LoRAFA,
        chunk_rows: int = HEAD_CHUNK_ROWS,
        precision: str = "float32",
        device: str = "cpu",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid; choose one of {PRECISIONS}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.lora = lora
        self.num_params = lora.num_params
        self.per_token = True
        self.chunk_rows = chunk_rows
        self.precision = precision
        self.shared = SharedBase(model) if precision == "shared-bf16" else None
        self.trunk = model.base_model  # the decoder without the LM head (e.g. LlamaModel)
        self.head = model.get_output_embeddings()

    def _token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of every target token per replica (dup, n) and the target ids (n,)."""
        b = b if b.dim() == 2 else b.unsqueeze(0)
        return self._token_nll_many(b, [batch], b.shape[0])[0]

    def _token_nll_many(
        self, b: torch.Tensor, batches: Sequence[Batch], dup: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_token_nll` of ``len(batches)`` clients in one trunk forward: client k's batch under replicas
        ``b[k*dup:(k+1)*dup]``. Batches need the same number of rows; narrower ones are right-padded (masked and
        unlabelled, which a causal LM's labelled positions never see)."""
        sizes = {bt["input_ids"].shape[0] for bt in batches}
        if len(sizes) != 1:
            raise ValueError(f"cross-client batching needs batches of equal size; got sizes {sorted(sizes)}")
        width = max(bt["input_ids"].shape[1] for bt in batches)
        ids = torch.cat([_pad(bt["input_ids"], width, 0).repeat(dup, 1) for bt in batches])
        mask = torch.cat([_pad(bt["attention_mask"], width, 0).repeat(dup, 1) for bt in batches])
        per_client = dup * sizes.pop()
        out = []
        with self.lora.use(b.to(self.device)), self._replicas(dup, len(batches)):
            hidden = self.trunk(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        for k, bt in enumerate(batches):
            t = bt["input_ids"].shape[1]
            targets = bt["labels"][:, 1:]
            sel = targets != -100  # the same positions in every replica
            tgt = targets[sel]
            h = hidden[k * per_client : (k + 1) * per_client, : t - 1]
            rows = h[sel.repeat(dup, 1).to(self.device)].reshape(dup, -1, h.shape[-1])  # replica-major
            with self._replicas(dup):
                nll = head_nll(self.head, rows, tgt.to(self.device), self.chunk_rows)
            out.append((nll.cpu(), tgt))
        return out

    def _nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per (replica, example) -> (dup, bs), and target-token counts per example (bs,)."""
        return example_sums(self._token_nll(b, batch)[0], batch)

    def _replicas(self, dup: int, groups: int = 1) -> AbstractContextManager:
        return self.shared.replicas(dup, groups) if self.shared is not None else nullcontext()

    def losses(self, b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean token NLL of ``batch`` under each replica of ``b`` (dup, P) -> (dup,), in ONE forward (with autograd,
        for the first-order baselines)."""
        return _mean_loss(*self._nll(b, batch))

    def perturbed_losses(
        self, b: torch.Tensor, batch: Batch, seeds: Sequence[int], zo: ZOConfig, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The 2q replicas b +/- eps z_i of :func:`~fedprge.engine.estimator.perturbed_replicas`, in one forward."""
        z = rng.directions(seeds, b.numel(), zo.distribution) if z is None else z
        with torch.no_grad():
            return self.losses(perturbed_replicas(b, z, zo.eps), batch)

    def perturbed_losses_many(
        self, bs: Sequence[torch.Tensor], batches: Sequence[Batch], zs: Sequence[torch.Tensor], eps: float
    ) -> torch.Tensor:
        """Cross-client batching: (K, 2q) perturbed losses of K clients, client k's replicas b_k +/- eps z_k on its
        own batch, all K in ONE forward (what :meth:`perturbed_losses` gives each, up to float rounding)."""
        reps = torch.cat([perturbed_replicas(b, z, eps) for b, z in zip(bs, zs, strict=True)])
        dup = reps.shape[0] // len(bs)
        with torch.no_grad():
            parts = self._token_nll_many(reps, batches, dup)
        sums = [example_sums(nll, bt) for (nll, _), bt in zip(parts, batches, strict=True)]
        return torch.stack([_mean_loss(*s) for s in sums])

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            sums, counts = self._nll(b.reshape(1, -1), batch)
        return sums[0], counts

    def token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            nll, tgt = self._token_nll(b.reshape(1, -1), batch)
        return nll[0], tgt
