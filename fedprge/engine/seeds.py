"""Every seed domain of a run in one table, and the direction seeds of a local step.

A run's random draws are ``rng.derive_seed(run_seed, DOMAIN, ...)`` or a numpy generator seeded with
``[run_seed, DOMAIN]``; the domain keeps the draws of different uses apart. The numbers are part of the protocol
(the server's replay, every client and the native clients derive the same seeds): never renumber one.

The frozen LoRA A matrices are drawn from ``derive_seed(lora.a_seed, layer)``, a root of their own. The round's
client sample is ``numpy.random.default_rng([run_seed, round])``, with no domain: rounds 9 and 12 seed it as
POISON and UNSEEN do (kept so that runs stay bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprge.engine import rng

# derive_seed(run_seed, DOMAIN, ...) unless marked numpy; the trailing parts of each use follow the comment
CLIENT_SCOPE = 1  # step directions, each client its own: round, partition, step, direction
ROUND_SCOPE = 2  # step directions shared by a round's clients: round, step, direction
POOL_INDEX = 3  # downlink=pool: which pool seed a direction is: round, [partition,] step, direction
POOL_SEED = 4  # downlink=pool: the pool's seeds: index in the pool
BATCH = 5  # a training step's minibatch: round, partition, step
PERSONAL = 6  # personalization: minibatch and private directions: tag, partition, step[, direction]
DROP = 7  # injected fault, a client drops out of a round: round, partition
STRAGGLE = 8  # injected fault, a client answers after the deadline: round, partition
POISON = 9  # numpy: the fixed set of hostile clients
EVAL_FAULT = 10  # injected evaluation faults: kind (0 slow, 1 failing), partition
DITTO = 11  # Ditto's private directions: round, partition, step, direction
UNSEEN = 12  # numpy: the newcomers that never train
DP_NOISE = 13  # privacy noise (fedprge/privacy.py), simulation only: 0 client, round, partition, step | 1 server, round
SECAGG_ROUNDING = 14  # numpy global: SecAgg+'s stochastic rounding of a client's vector (secagg.py): round, partition


@dataclass(frozen=True)
class SeedSpec:
    """How a client's direction seeds are derived; the same on server and clients."""

    run_seed: int
    q: int
    scope: str = "client"  # "client" | "round"
    pool_size: int = 0  # > 0: seeds come from a pool of this many (downlink "pool")

    def pool(self) -> list[int]:
        return [rng.derive_seed(self.run_seed, POOL_SEED, k) for k in range(self.pool_size)]


def step_seeds(spec: SeedSpec, rnd: int, partition: int, step: int) -> list[int]:
    """The q seeds of one local step of one client in one round."""
    who = (partition,) if spec.scope == "client" else ()
    if spec.pool_size:
        pool = spec.pool()
        idx = [rng.derive_seed(spec.run_seed, POOL_INDEX, rnd, *who, step, i) % spec.pool_size for i in range(spec.q)]
        return [pool[k] for k in idx]
    domain = CLIENT_SCOPE if spec.scope == "client" else ROUND_SCOPE
    return [rng.derive_seed(spec.run_seed, domain, rnd, *who, step, i) for i in range(spec.q)]


def private_seeds(run_seed: int, domain: int, tag: int, partition: int, step: int, q: int) -> list[int]:
    """The q directions of a client's private step (PERSONAL, DITTO): never sent, never replayed by the server."""
    return [rng.derive_seed(run_seed, domain, tag, partition, step, i) for i in range(q)]
