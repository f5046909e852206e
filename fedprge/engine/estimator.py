r"""P-RGE: parallelized randomized gradient estimation on the LoRA-FA state B (flat vector b of P entries).

One step with q directions z_1..z_q (each a pure function of a seed, :mod:`fedprge.engine.rng`):

    L^+_i = L(b + eps z_i),   L^-_i = L(b - eps z_i)          all 2q in ONE batched forward
    g_i   = (L^+_i - L^-_i) / (2 eps)                          the scalar projected gradients
    g    <- g * min(1, clip / rms(g))                          the step rule: a trust region on the step size
    b    <- b - lr * (1/q) * sum_i g_i z_i                     no autograd graph, no optimizer state

The step rule runs on the client, before the scalars are sent, so the server replays exactly what was applied.
Why it is there: the update's norm is about lr * rms(g) * sqrt(P / q), and rms(g) depends on the task. A
next-token loss averaged over a Shakespeare line gives rms(g) ~ 0.5-2 on SmolLM2; one label word of a tweet gives
10-30, and ten unclipped steps at the same lr pushed held-out perplexities above 10^4. ``clip`` (default 2, in
loss units per unit of eps, the same for every task since every loss is a token NLL) bounds the step instead.

The q directions are the outer loop, the +/- pair the inner loop of the paper's parallelism. The pair
(seeds, g) is everything needed to replay the step: :func:`apply_update` is the only code that changes b, and
both clients and the server call it, so a server's reconstruction cannot drift from what a client trained.
Because the update is linear in g, a weighted average of client updates is itself a replay (FedKSeed's
argument); this needs a constant lr and no weight decay, which is why there are none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fedprge.checks import check_range
from fedprge.engine import rng

LossFn = Callable[[torch.Tensor], torch.Tensor]  # (dup, P) replicas of b -> (dup,) losses on a fixed batch


@dataclass(frozen=True)
class ZOConfig:
    """Hyper-parameters of the zeroth-order step."""

    q: int = 4
    eps: float = 1e-2
    lr: float = 1e-3
    distribution: str = "gaussian"
    clip: float = 0.0  # bound on the RMS of a step's projected gradients (0: off); see the module docstring

    def __post_init__(self) -> None:
        check_range("q", self.q, "[1, inf)", integer=True, note="the number of directions")
        check_range("eps", self.eps, "(0, inf)", note="the perturbation size")
        check_range("lr", self.lr, "(0, inf)", note="the learning rate")
        check_range("clip", self.clip, "[0, inf)", note="0: off")
        rng.check_distribution(self.distribution)


@dataclass(frozen=True)
class StepRecord:
    """Everything a server needs to replay one step."""

    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]  # float32 values


def sum_of_squares(g: torch.Tensor) -> float:
    """Sum of g's squares in float64, in order (exact squares, IEEE sums): the same bits on every CPU and in the
    native client, which a scale built on torch's float32 sqrt is not (AVX-512: ~20% of inputs 1 ulp off)."""
    return sum(x * x for x in g.double().tolist())


def clip_rms(g: torch.Tensor, clip: float) -> torch.Tensor:
    """``g`` scaled down so that its root-mean-square is at most ``clip`` (unchanged when ``clip`` is 0)."""
    g = g.to(torch.float32)
    if clip <= 0:
        return g
    rms = math.sqrt(sum_of_squares(g) / len(g))
    return g * torch.tensor(clip / rms, dtype=torch.float32) if rms > clip else g


def apply_update(b: torch.Tensor, z: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """b - lr * mean_i(g_i z_i), accumulated element-wise in a fixed order (thread-count independent)."""
    g = g.to(torch.float32)
    acc = torch.zeros_like(b)
    for i in range(z.shape[0]):
        acc += g[i] * z[i]
    return b - (lr / z.shape[0]) * acc


def replay(b: torch.Tensor, records: Iterable[StepRecord], lr: float, distribution: str) -> torch.Tensor:
    """Apply recorded steps to b: the server's reconstruction of a client's trajectory."""
    for rec in records:
        if len(rec.seeds) != len(rec.projected_grads):
            raise ValueError(f"a step has {len(rec.seeds)} seeds but {len(rec.projected_grads)} projected grads")
        z = rng.directions(rec.seeds, b.numel(), distribution)
        b = apply_update(b, z, torch.tensor(rec.projected_grads, dtype=torch.float32), lr)
    return b


def perturbed_replicas(b: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """(2q, P): rows 0..q-1 are b + eps z_i, rows q..2q-1 are b - eps z_i."""
    return torch.cat([b + eps * z, b - eps * z])


def prge_step(loss_fn: LossFn, b: torch.Tensor, seeds: Sequence[int], cfg: ZOConfig) -> tuple[torch.Tensor, StepRecord]:
    """One P-RGE step on a ``loss_fn`` of replicas: the 2q perturbed losses in one call, then :func:`finish_step`."""
    z = rng.directions(seeds, b.numel(), cfg.distribution)
    with torch.no_grad():
        losses = loss_fn(perturbed_replicas(b, z, cfg.eps))
    return finish_step(b, z, seeds, losses, cfg)


def finish_step(
    b: torch.Tensor,
    z: torch.Tensor,
    seeds: Sequence[int],
    losses: torch.Tensor,
    cfg: ZOConfig,
    privatize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, StepRecord]:
    """The rest of a P-RGE step once its 2q losses (order of :func:`perturbed_replicas`) are known.

    Shared by :func:`prge_step` and every client, whose losses come from its backend's ``perturbed_losses`` (eager
    or an ExecuTorch program), so all turn losses into g and the new b with the same float32 ops. ``privatize``
    (DP-ZO, :mod:`fedprge.privacy`) maps g to what is applied and recorded: clipped and noised before use.
    """
    q = len(seeds)
    losses = losses.to(torch.float32)
    if losses.shape != (2 * q,):
        raise ValueError(f"a P-RGE step with q={q} needs 2q={2 * q} losses, got shape {tuple(losses.shape)}")
    g = clip_rms((losses[:q] - losses[q:]) / (2 * cfg.eps), cfg.clip)
    if privatize is not None:
        g = privatize(g)
    return apply_update(b, z, g, cfg.lr), StepRecord(tuple(int(s) for s in seeds), tuple(g.tolist()))


def sequential_step(
    loss_fn: LossFn, b: torch.Tensor, seeds: Sequence[int], cfg: ZOConfig
) -> tuple[torch.Tensor, StepRecord]:
    """Reference: the same step with 2q separate forward passes (MeZO-style; q=1 is plain MeZO/SPSA)."""
    z = rng.directions(seeds, b.numel(), cfg.distribution)
    g = torch.empty(len(seeds), dtype=torch.float32)
    with torch.no_grad():
        for i in range(len(seeds)):
            plus = loss_fn((b + cfg.eps * z[i]).unsqueeze(0))[0]
            minus = loss_fn((b - cfg.eps * z[i]).unsqueeze(0))[0]
            g[i] = (plus - minus) / (2 * cfg.eps)
    g = clip_rms(g, cfg.clip)
    return apply_update(b, z, g, cfg.lr), StepRecord(tuple(int(s) for s in seeds), tuple(g.tolist()))


def estimate_gradient(loss_fn: LossFn, b: torch.Tensor, seeds: Sequence[int], cfg: ZOConfig) -> torch.Tensor:
    """The P-RGE gradient estimate (1/q) sum_i g_i z_i itself (for analysis; a step applies lr times it)."""
    z = rng.directions(seeds, b.numel(), cfg.distribution)
    with torch.no_grad():
        losses = loss_fn(perturbed_replicas(b, z, cfg.eps)).to(torch.float32)
    g = (losses[: len(seeds)] - losses[len(seeds) :]) / (2 * cfg.eps)
    return (g.unsqueeze(1) * z).mean(0)
