"""First-order LoRA-FA baseline: the same adapters and loss, B trained by autograd."""

from __future__ import annotations

import torch

from fedprge.engine.backend import Batch, EagerBackend


class BackpropTrainer:
    """SGD or Adam on the flat B vector; A frozen as in LoRA-FA. Keeps activations for the backward pass."""

    OPTIMIZERS = ("sgd", "adam")

    def __init__(self, backend: EagerBackend, b: torch.Tensor, lr: float, optimizer: str = "sgd") -> None:
        if optimizer not in self.OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {self.OPTIMIZERS}")
        if not lr > 0:
            raise ValueError(f"lr={lr!r} is invalid; the learning rate must be > 0")
        self.backend = backend
        self.b = b.detach().clone().requires_grad_(True)
        cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        self.opt = cls([self.b], lr=lr)

    def step(self, batch: Batch) -> float:
        """One forward + backward + update; returns the loss before the update."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.backend.losses(self.b.unsqueeze(0), batch)[0]
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def gradient(self, batch: Batch) -> torch.Tensor:
        """The true gradient of the batch loss with respect to B (for checking the ZO estimator)."""
        self.opt.zero_grad(set_to_none=True)
        self.backend.losses(self.b.unsqueeze(0), batch)[0].backward()
        assert self.b.grad is not None
        return self.b.grad.detach().clone()

    @property
    def state(self) -> torch.Tensor:
        return self.b.detach().clone()
