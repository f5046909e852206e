"""DP-ZO: clipping and Gaussian noise on the projected gradients, and the (epsilon, delta) they spend.

The privacy unit is the user: one client's whole contribution to one round, i.e. its round vector of
``local_steps x q`` projected gradients. Two neighbouring federations differ in one client's data.

* ``local``: every local step's q-vector is clipped to L2 <= C / sqrt(local_steps) (so the round vector's norm is
  <= C) and N(0, (sigma C)^2) is added to every scalar, on the client, *before* the client applies the step. The
  noised scalars are what it applies and what it sends, so the server's replay stays exact. The steps of a round
  are an adaptive composition of Gaussian mechanisms of sensitivity C / sqrt(T) and noise sigma C: their RDP adds
  up to alpha / (2 sigma^2), that of one Gaussian mechanism with noise multiplier sigma on the whole round vector.
* ``central`` (``federation.seed_scope=round``, mean aggregation): clients clip the same way but add no noise;
  the server adds N(0, (sigma C w_max)^2) to the aggregated coefficient of every direction, w_max the largest
  aggregation weight of the round (1/n with equal weights: Flower's server-side fixed clipping convention).

The directions are public randomness drawn from seeds that do not depend on any data; only the scalars carry
data, and the scalars are what is clipped and noised, so knowing the seeds tells nothing beyond the noised
scalars. The accountant is Opacus's RDP accountant: one step per round, sampling rate = clients per round /
training clients (Poisson sampling assumed), ``federation.rounds`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedprge.config import RunConfig
from fedprge.engine import rng
from fedprge.engine.estimator import sum_of_squares
from fedprge.engine.seeds import DP_NOISE

ACCOUNTANT = "opacus.accountants.RDPAccountant"
LOCAL, SERVER = 0, 1  # the first part of a DP_NOISE seed: who draws the noise


def sample_rate(cfg: RunConfig) -> float:
    """The share of the training clients sampled in a round (newcomers never train)."""
    from fedprge.federation.sampling import sample_round, unseen_clients

    n = cfg.federation.clients - len(unseen_clients(cfg, cfg.federation.clients))
    return len(sample_round(cfg, cfg.federation.clients, 1)) / n


def epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    """The epsilon Opacus's RDP accountant gives for ``steps`` subsampled Gaussian steps (inf when sigma is 0)."""
    if sigma <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=16)
def calibrate(target_epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier that spends at most ``target_epsilon`` (Opacus's search, tolerance 0.01)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps))


def noise_multiplier(cfg: RunConfig) -> float:
    """sigma: ``privacy.noise_multiplier``, or calibrated from ``privacy.epsilon`` (the same on server and clients)."""
    p = cfg.privacy
    if p.epsilon > 0:
        return calibrate(p.epsilon, p.delta, sample_rate(cfg), cfg.federation.rounds)
    return p.noise_multiplier


def clip_l2(g: torch.Tensor, bound: float) -> torch.Tensor:
    """``g`` scaled down so that its L2 norm is at most ``bound`` (the norm in float64: the same bits on every CPU)."""
    norm = math.sqrt(sum_of_squares(g))
    return g * torch.tensor(bound / norm, dtype=torch.float32) if norm > bound else g


def noise(seed: int, n: int, std: float) -> torch.Tensor:
    """n float32 draws of N(0, std^2) from ``seed``.

    Simulation only: a deployment must draw the noise from the OS RNG, or anyone who knows the run seed can
    subtract it."""
    gen = torch.Generator().manual_seed(seed % 2**63)
    return torch.randn(n, generator=gen, dtype=torch.float32) * std


@dataclass(frozen=True)
class StepPrivatizer:
    """The client's per-step rule: clip a step's q-vector to C / sqrt(T), add local noise (``local`` mode)."""

    bound: float
    std: float  # 0 in central mode
    seed: int

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        g = clip_l2(g.to(torch.float32), self.bound)
        return g + noise(self.seed, g.numel(), self.std) if self.std > 0 else g


def step_rule(cfg: RunConfig, rnd: int, partition: int, step: int) -> StepPrivatizer | None:
    """What the client applies to step ``step``'s projected gradients before using and sending them (None: off)."""
    p = cfg.privacy
    if p.mode == "off":
        return None
    std = noise_multiplier(cfg) * p.clip if p.mode == "local" else 0.0
    seed = rng.derive_seed(cfg.seed, DP_NOISE, LOCAL, rnd, partition, step)
    return StepPrivatizer(p.clip / math.sqrt(cfg.federation.local_steps), std, seed)


def noise_aggregate(cfg: RunConfig, rnd: int, merged: dict[int, np.float32], max_weight: float) -> None:
    """Central mode: add N(0, (sigma C w_max)^2) to every aggregated coefficient of round ``rnd`` (in place)."""
    if cfg.privacy.mode != "central" or not merged:
        return
    std = noise_multiplier(cfg) * cfg.privacy.clip * max_weight
    seed = rng.derive_seed(cfg.seed, DP_NOISE, SERVER, rnd)
    for k, z in zip(list(merged), noise(seed, len(merged), std).tolist(), strict=True):
        merged[k] = np.float32(merged[k] + np.float32(z))


def report(cfg: RunConfig) -> dict[str, object]:
    """The summary's ``privacy`` block: the settings and the (epsilon, delta) a finished run has spent."""
    p, rounds = cfg.privacy, cfg.federation.rounds
    sigma, rate = noise_multiplier(cfg), sample_rate(cfg)
    return {
        "mode": p.mode,
        "unit": "user: one client's whole round vector of projected gradients",
        "clip": p.clip,
        "noise_multiplier": sigma,
        "target_epsilon": p.epsilon if p.epsilon > 0 else None,
        "delta": p.delta,
        "epsilon": epsilon(sigma, rate, rounds, p.delta),
        # without amplification by sampling: the bound when the round's sample is known (the server knows it)
        "epsilon_sample_known": epsilon(sigma, 1.0, rounds, p.delta),
        "sample_rate": rate,
        "rounds": rounds,
        "accountant": ACCOUNTANT,
    }
