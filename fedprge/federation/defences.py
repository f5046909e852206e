"""The server's rules against faulty and hostile replies, as plain functions of the replies' scalars.

:mod:`~fedprge.federation.replies` and :mod:`~fedprge.federation.aggregation` apply them (and log what each one
did); the rules themselves are spelled out in those modules' docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import RecordDict

from fedprge.federation.protocol import decode_grads


def lower_median(values: Iterable[float]) -> float:
    """The lower median (an actual element; with two values the smaller, so one outlier cannot set it)."""
    v = sorted(values)
    return v[(len(v) - 1) // 2]


def norms(grads: list[np.ndarray]) -> list[float]:
    """L2 norm of each client's projected-gradient array, in float64."""
    return [float(np.linalg.norm(g.astype(np.float64))) for g in grads]


def check_reply(content: RecordDict, local_steps: int, q: int, max_abs_grad: float) -> tuple[np.ndarray, float]:
    """The (local_steps, q) projected gradients and the train loss of a reply; ValueError naming the broken rule."""
    if "update" not in content or "metrics" not in content:
        raise ValueError(f"the reply lacks the 'update' or 'metrics' record (has {sorted(content.keys())})")
    g = decode_grads(content["update"], local_steps, q)
    try:
        loss = float(content["metrics"]["train_loss"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the reply has no numeric 'train_loss' metric") from None
    bad = int((~np.isfinite(g)).sum())
    if bad:
        raise ValueError(f"{bad} of {g.size} projected gradients are not finite (NaN/inf)")
    if not math.isfinite(loss):
        raise ValueError(f"train_loss={loss} is not finite")
    peak = float(np.abs(g).max()) if g.size else 0.0
    if max_abs_grad and peak > max_abs_grad:
        raise ValueError(
            f"a projected gradient of magnitude {peak:.3g} exceeds federation.max_abs_grad={max_abs_grad:g}"
        )
    return g, loss


def scale_to(g: np.ndarray, norm: float, limit: float) -> np.ndarray:
    """``g`` (of L2 norm ``norm``) scaled down to norm ``limit`` if it is above it."""
    return g if norm <= limit else (g * np.float32(limit / norm)).astype(np.float32)


def bound_norms(grads: list[np.ndarray], bound: float) -> tuple[list[np.ndarray], dict[int, float], float]:
    """Scale every client above ``bound`` x the lower median norm down to it.

    Returns the grads, ``{index: norm before clipping}`` of the clipped clients, and the median norm."""
    if not bound or len(grads) < 2:
        return grads, {}, math.nan
    ns = norms(grads)
    ref = lower_median(ns)
    if ref <= 0:
        return grads, {}, ref
    limit = bound * ref
    clipped = {i: n for i, n in enumerate(ns) if n > limit}
    return [scale_to(g, n, limit) for g, n in zip(grads, ns, strict=True)], clipped, ref


def extreme_norms(grads: list[np.ndarray], k: int, ties: list[int]) -> list[int]:
    """Indices of the ``k`` smallest and ``k`` largest norms (ties broken by ``ties``), for a trimmed mean."""
    ns = norms(grads)
    order = sorted(range(len(grads)), key=lambda i: (ns[i], ties[i]))
    return sorted(order[:k] + order[len(grads) - k :]) if k else []


def clip_to_median(grads: list[np.ndarray]) -> list[np.ndarray]:
    """Every client scaled down to at most the lower median norm (``median`` with per-client directions)."""
    if len(grads) < 2:
        return grads
    ns = norms(grads)
    ref = lower_median(ns)
    return [scale_to(g, n, ref) for g, n in zip(grads, ns, strict=True)]


def coordinate_rule(grads: list[np.ndarray], aggregation: str, k: int) -> np.ndarray:
    """Coordinate-wise median or k-trimmed mean of aligned scalars (every client used the same seeds)."""
    stack = np.stack(grads)
    if aggregation == "median":
        coord = np.median(stack, axis=0)
    else:
        coord = np.sort(stack, axis=0)[k : len(grads) - k].mean(axis=0)
    return coord.astype(np.float32)
