"""Splitting a pool of examples over clients, and each client's examples into train and test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprge.data.types import ClientDataset, Example

MIN_EACH = 2  # iid / dirichlet clients get at least this many train and this many test examples


def n_test(n: int, test_fraction: float) -> int:
    """Test examples out of ``n``: ``n * test_fraction`` rounded, at least 1, leaving at least 1 to train."""
    return min(n - 1, max(1, int(n * test_fraction + 0.5))) if n >= 2 else 0


def min_client_size(test_fraction: float, min_each: int = MIN_EACH) -> int:
    """Smallest client size whose split leaves ``min_each`` examples on both sides."""
    n = 2 * min_each
    while not (n_test(n, test_fraction) >= min_each and n - n_test(n, test_fraction) >= min_each):
        n += 1
    return n


def split_tail(items: Sequence[Example], test_fraction: float) -> tuple[list[Example], list[Example]]:
    """Train = the leading examples, test = the last ``test_fraction`` of them (time order, as in LEAF)."""
    k = n_test(len(items), test_fraction)
    return list(items[: len(items) - k]), list(items[len(items) - k :])


def client_names(num_clients: int) -> list[str]:
    width = max(3, len(str(num_clients - 1)))
    return [f"client{i:0{width}d}" for i in range(num_clients)]


def natural(groups: Sequence[tuple[str, Sequence[Example]]], test_fraction: float) -> list[ClientDataset]:
    """One client per given group, split by time order."""
    return [ClientDataset(cid, *split_tail(items, test_fraction)) for cid, items in groups]


def iid(
    items: Sequence[Example], num_clients: int, test_fraction: float, rng: np.random.Generator
) -> list[ClientDataset]:
    """Shuffle the pool and deal it round-robin, so client sizes differ by at most one."""
    need = min_client_size(test_fraction)
    if len(items) // num_clients < need:
        raise ValueError(
            f"num_clients={num_clients} is more than the {len(items)} examples allow for an iid split "
            f"(at most {len(items) // need} clients of >= {need} examples)"
        )
    order = rng.permutation(len(items))
    return [
        ClientDataset(cid, *split_tail([items[j] for j in order[i::num_clients]], test_fraction))
        for i, cid in enumerate(client_names(num_clients))
    ]


def dirichlet(
    items: Sequence[Example],
    num_clients: int,
    alpha: float,
    test_fraction: float,
    rng: np.random.Generator,
) -> list[ClientDataset]:
    """Label skew: each label's examples go to clients in proportions drawn from Dirichlet(alpha).

    Clients left with fewer than :func:`min_client_size` examples are then topped up, one example at a time,
    from the currently largest client, so every client has a few train and test examples.
    """
    need = min_client_size(test_fraction)
    if len(items) // num_clients < need:
        raise ValueError(
            f"num_clients={num_clients} is more than the {len(items)} examples allow for a dirichlet split "
            f"(at most {len(items) // need} clients of >= {need} examples)"
        )
    labels = np.array([ex.target for ex in items])
    buckets: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
        for bucket, part in zip(buckets, np.split(idx, cuts), strict=True):
            bucket.extend(part.tolist())
    while True:
        sizes = [len(b) for b in buckets]
        small = int(np.argmin(sizes))
        if sizes[small] >= need:
            break
        buckets[small].append(buckets[int(np.argmax(sizes))].pop())
    return [
        ClientDataset(cid, *split_tail([items[j] for j in rng.permutation(bucket)], test_fraction))
        for cid, bucket in zip(client_names(num_clients), buckets, strict=True)
    ]


def cap(clients: list[ClientDataset], max_train: int | None, max_test: int | None) -> list[ClientDataset]:
    """Keep the first ``max_train`` / ``max_test`` examples of each client (None: keep all)."""
    for c in clients:
        c.train = c.train if max_train is None else c.train[:max_train]
        c.test = c.test if max_test is None else c.test[:max_test]
    return clients


def carve_validation(clients: list[ClientDataset], val_fraction: float, max_val: int | None) -> list[ClientDataset]:
    """Move the last ``val_fraction`` of each client's training examples (at most ``max_val``, at least one, and
    never the last training example) into its validation split; the test split is not touched."""
    for c in clients:
        n = len(c.train)
        k = min(n - 1, max(1, int(n * val_fraction + 0.5))) if val_fraction > 0 and n >= 2 else 0
        k = k if max_val is None else min(k, max_val)
        c.train, c.val = c.train[: n - k], c.train[n - k :]
    return clients
