"""Injected faults for reliability studies: dropped clients, stragglers and poisoned updates.

Every decision is a pure function of the run seed, the round and the partition (``faults`` config section), so a
faulty run is reproducible and the server-side tests can predict it. The faults act inside the real ClientApp
(:mod:`fedprge.federation.client_app`); drop, straggler and poison act on ``train`` messages only:

* drop (``drop_rate``, per round and client): the client answers with a Flower error reply
  (``ErrorCode.NODE_UNAVAILABLE``) and does nothing else, as a phone that went offline.
* straggler (``straggler_rate``, per round and client, never together with a drop): the client sleeps
  ``federation.timeout_s + straggler_delay_s`` before training, so its reply comes after the round's deadline.
* poison (``poison_fraction`` of the clients, a fixed set chosen by the run seed, ``poison_kind``):
  ``nan`` / ``inf``: non-finite scalars; ``huge``: every scalar +-1e30; ``wrong_count``: one scalar short;
  ``scaled``: the honest scalars times ``poison_scale`` (default -100: an amplified, sign-flipped update);
  ``count``: honest scalars, but a million times its real example count at registration and in replies.

Evaluation faults act on ``evaluate`` messages, for a fixed set of clients (a function of the run seed and the
partition), so the server's progress deadline and retries (``eval.timeout_s``, ``eval.retries``) can be tested:

* slow evaluation (``eval_straggler_rate``): every evaluation reply of the client comes ``eval_delay_s`` late.
* failed evaluation (``eval_drop_rate``): the client's first ``eval_drop_attempts`` attempts at an evaluation
  (the ``attempt`` field of the message's ``eval`` record) answer with an error reply, as ``drop`` does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from fedprge.config import RunConfig
from fedprge.engine import rng
from fedprge.engine.seeds import DROP, EVAL_FAULT, POISON, STRAGGLE

_EVAL_SLOW, _EVAL_DROP = 0, 1  # the kinds of the EVAL_FAULT domain
HUGE = 1e30
COUNT_FACTOR = 1_000_000


@dataclass(frozen=True)
class Fault:
    """What goes wrong for one client in one round."""

    drop: bool = False
    straggle: bool = False
    poison: str | None = None


def _uniform(seed: int, domain: int, rnd: int, partition: int) -> float:
    return rng.derive_seed(seed, domain, rnd, partition) / rng.SEED_LIMIT


@lru_cache(maxsize=16)
def _poisoned(seed: int, clients: int, fraction: float) -> frozenset[int]:
    k = min(clients, math.ceil(fraction * clients - 1e-9)) if fraction > 0 else 0
    return frozenset(int(i) for i in np.random.default_rng([seed, POISON]).choice(clients, size=k, replace=False))


def poisoned_partitions(cfg: RunConfig) -> frozenset[int]:
    """The fixed set of hostile clients: ``ceil(poison_fraction * clients)`` partitions drawn by the run seed."""
    return _poisoned(cfg.seed, cfg.federation.clients, cfg.faults.poison_fraction)


def fault_for(cfg: RunConfig, rnd: int, partition: int) -> Fault:
    """The faults of client ``partition`` in training round ``rnd``."""
    f = cfg.faults
    drop = f.drop_rate > 0 and _uniform(cfg.seed, DROP, rnd, partition) < f.drop_rate
    straggle = not drop and f.straggler_rate > 0 and _uniform(cfg.seed, STRAGGLE, rnd, partition) < f.straggler_rate
    poison = f.poison_kind if partition in poisoned_partitions(cfg) else None
    return Fault(drop, straggle, poison)


@dataclass(frozen=True)
class EvalFault:
    """What goes wrong for one client at one attempt of an evaluation."""

    drop: bool = False
    delay_s: float = 0.0


def eval_fault_for(cfg: RunConfig, partition: int, attempt: int = 0) -> EvalFault:
    """The evaluation faults of client ``partition`` at attempt ``attempt`` (0: the first) of any evaluation."""
    f = cfg.faults
    failing = f.eval_drop_rate > 0 and _uniform(cfg.seed, EVAL_FAULT, _EVAL_DROP, partition) < f.eval_drop_rate
    slow = f.eval_straggler_rate > 0 and _uniform(cfg.seed, EVAL_FAULT, _EVAL_SLOW, partition) < f.eval_straggler_rate
    return EvalFault(failing and attempt < f.eval_drop_attempts, f.eval_delay_s if slow else 0.0)


def eval_dropped_reply(msg: Message, partition: int, attempt: int) -> Message:
    """The error reply of a client whose evaluation attempt failed."""
    reason = f"injected fault: client {partition} failed evaluation attempt {attempt + 1}"
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=msg)


def dropped_reply(msg: Message, partition: int, rnd: int) -> Message:
    """The error reply of a client that dropped out of a round."""
    reason = f"injected fault: client {partition} dropped out of round {rnd}"
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=msg)


def straggle(cfg: RunConfig) -> None:
    """Sleep past the round's deadline."""
    time.sleep(cfg.federation.timeout_s + cfg.faults.straggler_delay_s)


def corrupt(grads: np.ndarray, kind: str | None, scale: float) -> np.ndarray:
    """The flat float32 scalars a client sends: its honest ``grads`` or their poisoned version."""
    g = np.asarray(grads, dtype=np.float32).ravel().copy()
    if kind is None or kind == "count":
        return g
    if kind == "nan":
        g[::2] = np.nan
    elif kind == "inf":
        g[0] = np.inf
    elif kind == "huge":
        g = np.where(g < 0, -HUGE, HUGE).astype(np.float32)
    elif kind == "wrong_count":
        g = g[:-1] if g.size > 1 else np.zeros(2, np.float32)
    elif kind == "scaled":
        g *= np.float32(scale)
    else:
        raise ValueError(f"unknown poison kind {kind!r}; see fedprge.config_rules.POISON_KINDS")
    return g


def claimed_examples(cfg: RunConfig, partition: int, num_examples: int) -> int:
    """The example count a client reports: inflated for ``poison_kind=count`` attackers."""
    hostile = cfg.faults.poison_kind == "count" and partition in poisoned_partitions(cfg)
    return num_examples * COUNT_FACTOR if hostile else num_examples
