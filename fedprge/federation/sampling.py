"""Which clients take part in a round: a pure function of the run seed and the round, shared by all strategies."""

from __future__ import annotations

import numpy as np

from fedprge.config import RunConfig


def sample_round(cfg: RunConfig, num_clients: int, rnd: int) -> list[int]:
    """Sorted indices into the partition-ordered client list of those sampled in round ``rnd``."""
    f = cfg.federation
    k = min(num_clients, max(f.min_clients, int(np.ceil(f.fraction * num_clients))))
    gen = np.random.default_rng([cfg.seed, rnd])
    return sorted(int(i) for i in gen.choice(num_clients, size=k, replace=False))
