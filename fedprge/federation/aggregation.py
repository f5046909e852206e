"""A round's accepted scalars combined into one seed/coefficient list (the numeric rules are in ``defences.py``).

* Norm bound: a client whose projected-gradient vector has an L2 norm above ``federation.norm_bound`` x the lower
  median norm of the round's accepted clients is scaled down to that norm (with one client there is no reference).
* ``federation.aggregation``: ``mean`` is the example-weighted mean. With ``seed_scope=round`` every client of a
  round uses the same seeds, so ``median`` / ``trimmed_mean`` act coordinate-wise on the aligned scalars (one
  value per seed, unweighted; ``trimmed_mean`` cuts ``floor(trim_fraction x n)`` values at each end). With
  ``seed_scope=client`` the directions differ per client and only norms are comparable: ``trimmed_mean`` drops the
  ``floor(trim_fraction x n)`` clients with the smallest and the largest norms, ``median`` clips every client to
  the median norm; both then take the weighted mean. Every result is a seed/coefficient list.
"""

from __future__ import annotations

import logging

import numpy as np

from fedprge.config import FederationSection
from fedprge.engine.seeds import SeedSpec, step_seeds
from fedprge.federation.defences import bound_norms, clip_to_median, coordinate_rule, extreme_norms
from fedprge.federation.registry import Client
from fedprge.federation.replies import RoundStats

log = logging.getLogger("fedprge.server")


def apply_norm_bound(
    stats: RoundStats, clients: list[Client], grads: list[np.ndarray], bound: float
) -> list[np.ndarray]:
    """Scale down every client whose norm exceeds ``bound`` x the round's lower median norm (logged, counted)."""
    out, clipped, ref = bound_norms(grads, bound)
    for i, norm in clipped.items():
        stats.clipped.append(clients[i].partition)
        log.warning(
            "round %d: clipped client %d: projected-gradient norm %.4g > federation.norm_bound=%g x median %.4g",
            stats.rnd,
            clients[i].partition,
            norm,
            bound,
            ref,
        )
    return out


def merge_aligned(spec: SeedSpec, rnd: int, partition: int, per_step: np.ndarray) -> dict[int, np.float32]:
    """One value per direction of round ``rnd`` (``seed_scope=round``: every client's seeds are ``partition``'s) as
    {seed: coefficient}; a seed that repeats (a pool) adds up."""
    merged: dict[int, np.float32] = {}
    for step in range(per_step.shape[0]):
        for seed, v in zip(step_seeds(spec, rnd, partition, step), per_step[step], strict=True):
            merged[seed] = merged.get(seed, np.float32(0)) + np.float32(v)
    return merged


def combine(
    stats: RoundStats,
    clients: list[Client],
    grads: list[np.ndarray],
    fed: FederationSection,
    spec: SeedSpec,
    weight: dict[int, float],
) -> dict[int, np.float32]:
    """The round's aggregated update as {seed: coefficient}; ``weight``: aggregation weight by partition."""
    n, rnd = len(clients), stats.rnd
    k = int(fed.trim_fraction * n) if fed.aggregation == "trimmed_mean" else 0
    if fed.aggregation != "mean" and spec.scope == "round":  # aligned: one value per seed
        return merge_aligned(spec, rnd, clients[0].partition, coordinate_rule(grads, fed.aggregation, k))
    merged: dict[int, np.float32] = {}
    if fed.aggregation == "trimmed_mean" and k:  # per-client directions: trim by norm
        cut = extreme_norms(grads, k, [c.partition for c in clients])
        stats.trimmed = sorted(clients[i].partition for i in cut)
        log.info("round %d: trimmed_mean left out clients %s (extreme norms)", rnd, stats.trimmed)
        keep = [i for i in range(n) if i not in cut]
        clients, grads = [clients[i] for i in keep], [grads[i] for i in keep]
    elif fed.aggregation == "median":  # per-client directions: every client at most the median norm
        grads = clip_to_median(grads)
    total = sum(weight[c.partition] for c in clients)
    for c, g in zip(clients, grads, strict=True):
        w = np.float32(weight[c.partition] / total)
        for step in range(fed.local_steps):
            for seed, gi in zip(step_seeds(spec, rnd, c.partition, step), g[step], strict=True):
                merged[seed] = merged.get(seed, np.float32(0)) + w * gi
    return merged
