r"""bf16 matmuls for the 2q replicas of a P-RGE forward, with rounding that cancels in the projected gradients.

Running the frozen model in bf16 is ~3x faster on a CPU with bf16 units, but every replica then carries its
own rounding error, and ``g = (L+ - L-) / 2eps`` divides that error by a small eps (43% off fp32 on SmolLM2).
Here each frozen linear layer instead computes, for the ``dup`` replica slices x_0..x_{dup-1} of its input,

    y_0 = W x_0                  in bf16: its rounding is common to every replica
    y_k = y_0 + W (x_k - x_0)    the difference in bf16: x_k - x_0 is small, so is its rounding error

so all replicas ride on one shared (bf16) base and only their small differences are rounded on their own.
Everything else (norms, attention, activations, LoRA terms, loss) stays fp32. The cost is the same number of
matmul rows as plain bf16 plus a bf16 copy of each frozen weight (half the model's fp32 size). Several clients in
one forward (cross-client batching) are ``groups`` of ``dup`` replicas, each group with its own base.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("float32", "shared-bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # config: "auto" is resolved on the machine that runs the forward


def has_bf16_units(device: str = "cpu") -> bool:
    """bf16 matrix units on ``device``: a CUDA device has them; a CPU has AVX-512 BF16 or AMX-BF16 (its
    /proc/cpuinfo flags)."""
    if device == "cuda":
        return torch.cuda.is_available()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto``: shared-bf16 where ``device`` has bf16 units (see :func:`has_bf16_units`), float32 elsewhere."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision={precision!r} is invalid; choose one of {PRECISION_CHOICES}")
    if precision != "auto":
        return precision
    return "shared-bf16" if has_bf16_units(device) else "float32"


class SharedBaseLinear(nn.Module):
    """A frozen ``nn.Linear`` that evaluates ``dup`` equal replica slices of its input as base + differences."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("w16", base.weight.detach().to(torch.bfloat16), persistent=False)
        self.dup = 1  # set by SharedBase.replicas(); 1 = an ordinary fp32 linear
        self.groups = 1  # independent sets of dup replicas (one per client), each with its own base

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the layer (e.g. dtype checks) sees the real weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dup < 2:
            return self.base(x)
        xs = x.reshape(self.groups, self.dup, -1, x.shape[-1])
        d = torch.empty(xs.shape, dtype=torch.bfloat16, device=x.device)
        d[:, 0] = xs[:, 0]
        torch.sub(xs[:, 1:], xs[:, :1], out=d[:, 1:])
        y = torch.matmul(d, self.w16.t()).float()
        y[:, 1:] += y[:, :1]
        if self.base.bias is not None:
            y += self.base.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SharedBase:
    """Swaps every frozen ``nn.Linear`` of ``model`` (LoRA-FA base layers and the LM head included)."""

    def __init__(self, model: nn.Module) -> None:
        if next(model.parameters()).dtype != torch.float32:
            raise ValueError("precision='shared-bf16' needs a float32 model (model.dtype=float32)")
        self.layers: list[SharedBaseLinear] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    layer = SharedBaseLinear(child)
                    setattr(parent, name, layer)
                    self.layers.append(layer)

    @contextmanager
    def replicas(self, dup: int, groups: int = 1) -> Iterator[None]:
        """Inputs of every swapped layer consist of ``groups`` x ``dup`` equal slices, group- then replica-major,
        inside this block; the first replica of each group is that group's base."""
        for layer in self.layers:
            layer.dup, layer.groups = dup, groups
        try:
            yield
        finally:
            for layer in self.layers:
                layer.dup, layer.groups = 1, 1
