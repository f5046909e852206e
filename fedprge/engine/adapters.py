"""LoRA-FA adapters with per-replica B: the layer that lets 2q perturbed copies share one forward pass.

Each target ``nn.Linear`` W becomes ``y = W x + (alpha / r) * B_k (A x)``: A (r x in) is frozen and drawn
from a seed; B (out x r) starts at zero and is the only trained state. During a P-RGE step the batch is
repeated ``dup = 2q`` times and slice k of the batch sees its own copy B_k, so the base weights are read
once for all copies. peft's LoRA has no per-copy dimension for B, so this one small module is ours;
peft's own matching rule decides which modules are targets.

All B matrices live in one flat vector ``b`` (module order, each B row-major), which is exactly the vector
the directions of :mod:`fedprge.engine.rng` are drawn over.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedprge.engine import rng


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scaling and placement of the LoRA-FA adapters; ``a_seed`` fixes the frozen A matrices."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    a_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank={self.rank!r} is invalid; it must be an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"lora alpha={self.alpha!r} is invalid; it must be a number > 0")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"lora target_modules={self.target_modules!r} is invalid; give a non-empty list of module "
                "names such as ['q_proj', 'v_proj']"
            )
        if not (isinstance(self.a_seed, int) and 0 <= self.a_seed < rng.SEED_LIMIT):
            raise ValueError(f"lora a_seed={self.a_seed!r} is invalid; it must be an integer in [0, 2**32)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAFALinear(nn.Module):
    """``base(x) + scale * B_k (A x)`` where k indexes ``dup`` equal slices of the batch."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("A", A.to(base.weight.dtype))
        self.scale = scale
        self.rank = A.shape[0]
        self.B: torch.Tensor | None = None  # (dup, out, r), set by LoRAFA.use()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.B is None:
            return y
        B = self.B.to(x.dtype)
        xa = F.linear(x, self.A).reshape(B.shape[0], -1, self.rank)
        delta = torch.bmm(xa, B.transpose(1, 2))
        return y + self.scale * delta.reshape(y.shape)


class LoRAFA:
    """LoRA-FA adapters attached in place to a causal LM; B is handled as a flat vector of ``num_params``."""

    def __init__(self, model: nn.Module, config: LoRAConfig) -> None:
        from peft import LoraConfig  # here, not at import: an ExecuTorch client process never needs peft
        from peft.tuners.tuners_utils import check_target_module_exists

        self.model = model
        self.config = config
        peft_cfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules))
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        names = [n for n in linears if check_target_module_exists(peft_cfg, n)]
        for target in config.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                available = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise ValueError(
                    f"lora target module {target!r} matches no nn.Linear in {type(model).__name__}; "
                    f"available: {available}"
                )
        self.names: list[str] = names
        self.layers: list[LoRAFALinear] = []
        self.shapes: list[tuple[int, int]] = []
        offset = 0
        for i, name in enumerate(names):
            base = linears[name]
            A = self._init_A(config.a_seed, i, config.rank, base.in_features)
            layer = LoRAFALinear(base, A, config.scale)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers.append(layer)
            self.shapes.append((base.out_features, config.rank))
            offset += base.out_features * config.rank
        self.num_params = offset

    @staticmethod
    def _init_A(a_seed: int, index: int, rank: int, in_features: int) -> torch.Tensor:
        """Kaiming-uniform (a=sqrt(5)) as in peft, drawn from our portable generator."""
        bound = 1.0 / math.sqrt(in_features)
        u = rng.uniform(rng.derive_seed(a_seed, index), rank * in_features)
        return ((2 * u - 1) * bound).reshape(rank, in_features)

    def zeros(self) -> torch.Tensor:
        """The initial B state (all zeros), flat float32."""
        return torch.zeros(self.num_params, dtype=torch.float32)

    def split(self, b: torch.Tensor) -> list[torch.Tensor]:
        """(dup, P) flat replicas -> per-module (dup, out, r) views."""
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.shape[-1] != self.num_params:
            raise ValueError(f"B vector has {b.shape[-1]} entries, the adapters have {self.num_params}")
        out, start = [], 0
        for o, r in self.shapes:
            out.append(b[:, start : start + o * r].reshape(b.shape[0], o, r))
            start += o * r
        return out

    @contextmanager
    def use(self, b: torch.Tensor) -> Iterator[None]:
        """Run the model with B replicas ``b`` of shape (dup, P) (or (P,) for a single copy)."""
        for layer, B in zip(self.layers, self.split(b), strict=True):
            layer.B = B
        try:
            yield
        finally:
            for layer in self.layers:
                layer.B = None
