"""Which clients take part in a round: a pure function of the run seed and the round, shared by all strategies."""

from __future__ import annotations

import math

import numpy as np

from fedprge.config import RunConfig
from fedprge.engine.seeds import UNSEEN


def unseen_clients(cfg: RunConfig, num_clients: int) -> list[int]:
    """The fixed newcomers: ``round(eval.unseen_fraction * num_clients)`` indices that never train (sorted)."""
    k = min(num_clients - 1, math.floor(cfg.eval.unseen_fraction * num_clients + 0.5))
    if k <= 0:
        return []
    return sorted(int(i) for i in np.random.default_rng([cfg.seed, UNSEEN]).choice(num_clients, k, replace=False))


def sample_round(cfg: RunConfig, num_clients: int, rnd: int) -> list[int]:
    """Sorted indices into the partition-ordered client list of those sampled in round ``rnd`` (newcomers never)."""
    f = cfg.federation
    unseen = set(unseen_clients(cfg, num_clients))
    pool = [i for i in range(num_clients) if i not in unseen]
    k = min(len(pool), max(f.min_clients, int(np.ceil(f.fraction * len(pool)))))
    gen = np.random.default_rng([cfg.seed, rnd])  # no seed domain: see fedprge.engine.seeds
    return sorted(pool[int(i)] for i in gen.choice(len(pool), size=k, replace=False))
