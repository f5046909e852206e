"""The global B's updates in seed form, applied by one set of functions on the server and on every client.

A round's update is b <- b - (lr / q) * sum_k coefs_k z(seeds_k) (:func:`apply_round`); the pool form keeps one
cumulative coefficient per pool seed and rebuilds B from zero (:func:`pool_b`). :func:`replay_client` is the
server's reconstruction of one client's local steps, to compare with the B it reports (``federation.verify``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedprge.engine.estimator import StepRecord, ZOConfig, replay
from fedprge.engine.seeds import SeedSpec, step_seeds
from fedprge.federation.protocol import RoundUpdate, apply_coefficients


def apply_round(b: torch.Tensor, update: RoundUpdate, zo: ZOConfig) -> torch.Tensor:
    """``b`` after one round's aggregated seed/coefficient update."""
    return apply_coefficients(b, update.seeds, update.coefs, zo.lr / zo.q, zo.distribution)


def catch_up(
    b: torch.Tensor,
    synced: int,
    updates: list[RoundUpdate],
    zo: ZOConfig,
    apply: Callable[[torch.Tensor, RoundUpdate], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Apply the seed updates after round ``synced`` in order; returns B and the round it now reflects.

    Rounds already applied are skipped (the server resends when it did not see a node's last reply); a gap
    raises ValueError. ``apply(b, update)``, when given, stands in for :func:`apply_round` (a memoised one)."""
    apply = apply or (lambda b, upd: apply_round(b, upd, zo))
    for upd in updates:
        if upd.rnd <= synced:
            continue
        if upd.rnd != synced + 1:
            raise ValueError(f"seed update for round {upd.rnd} arrived but this node is at round {synced}")
        b = apply(b, upd)
        synced = upd.rnd
    return b, synced


def add_to_pool(pool_coefs: np.ndarray, pool_index: dict[int, int], update: RoundUpdate) -> None:
    """Add a round's coefficients to the cumulative pool coefficients (in place)."""
    for s, v in zip(update.seeds, update.coefs, strict=True):
        pool_coefs[pool_index[s]] += v


def pool_b(spec: SeedSpec, pool_coefs: np.ndarray, num_params: int, zo: ZOConfig) -> torch.Tensor:
    """The global B of the pool form: b0 = 0 moved by every pool seed's cumulative coefficient."""
    return apply_coefficients(torch.zeros(num_params), spec.pool(), pool_coefs, zo.lr / zo.q, zo.distribution)


def replay_client(
    start_b: torch.Tensor, spec: SeedSpec, rnd: int, partition: int, grads: np.ndarray, zo: ZOConfig
) -> torch.Tensor:
    """Client ``partition``'s B after its local steps of round ``rnd`` from ``start_b``, rebuilt from its scalars."""
    records = [
        StepRecord(tuple(step_seeds(spec, rnd, partition, t)), tuple(grads[t].tolist())) for t in range(grads.shape[0])
    ]
    return replay(start_b, records, zo.lr, zo.distribution)


def relative_error(mine: torch.Tensor, theirs: np.ndarray) -> float:
    """Relative L2 distance between a reconstruction and the B a client reported."""
    ref = torch.from_numpy(theirs)
    return float((mine - ref).norm() / ref.norm().clamp(min=1e-30))
