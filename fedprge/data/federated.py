"""``load_federated``: a task name plus a partition scheme -> a :class:`FederatedDataset`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprge.checks import check_range
from fedprge.data import jsonl, shakespeare, tweets
from fedprge.data import partition as parts
from fedprge.data.types import ClientDataset, Example, FederatedDataset

PARTITIONS = ("natural", "iid", "dirichlet")


def _validate(
    task: object,
    num_clients: object,
    partition: object,
    alpha: object,
    seed: object,
    test_fraction: object,
    limits: dict[str, object],
    chunk_words: object,
) -> None:
    if not isinstance(task, str) or not (task in ("shakespeare", "tweets") or task.endswith(".jsonl")):
        raise ValueError(f"unknown task {task!r}; expected 'shakespeare', 'tweets' or a path ending in .jsonl")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; expected one of {', '.join(PARTITIONS)}")
    check_range("num_clients", num_clients, "[1, inf)", integer=True)
    check_range("alpha", alpha, "(0, inf)", note="the Dirichlet concentration")
    check_range("seed", seed, "[0, inf)", integer=True)
    check_range("test_fraction", test_fraction, "(0, 1)")
    for name, value in limits.items():
        if value is not None:
            check_range(name, value, "[0, inf)", integer=True, note="None: no limit")
    check_range("chunk_words", chunk_words, "[1, inf)", integer=True)


def _no_labels(task: str) -> ValueError:
    return ValueError(
        f"partition='dirichlet' needs class labels, but task {task!r} is language modelling; use 'natural' or 'iid'"
    )


def _top_groups(
    groups: Sequence[tuple[str, int, Sequence[Example]]], num_clients: int, what: str
) -> list[tuple[str, Sequence[Example]]]:
    """The ``num_clients`` groups with the most text (ties by id) among those with >= 2 examples."""
    eligible = sorted((g for g in groups if len(g[2]) >= 2), key=lambda g: (-g[1], g[0]))
    if num_clients > len(eligible):
        raise ValueError(f"num_clients={num_clients} is more than the {len(eligible)} {what} available")
    return [(cid, items) for cid, _, items in eligible[:num_clients]]


def _pooled(
    examples: Sequence[Example],
    num_clients: int,
    partition: str,
    alpha: float,
    test_fraction: float,
    rng: np.random.Generator,
) -> list[ClientDataset]:
    if partition == "iid":
        return parts.iid(examples, num_clients, test_fraction, rng)
    return parts.dirichlet(examples, num_clients, alpha, test_fraction, rng)


def _shakespeare(
    num_clients: int, partition: str, test_fraction: float, chunk_words: int, rng: np.random.Generator
) -> list[ClientDataset]:
    if partition == "dirichlet":
        raise _no_labels("shakespeare")
    groups = [
        (cid, words, [Example("", c) for c in chunks]) for cid, words, chunks in shakespeare.role_chunks(chunk_words)
    ]
    top = _top_groups(groups, num_clients, "speaking roles with at least 2 chunks")
    if partition == "natural":
        return parts.natural(top, test_fraction)
    return parts.iid([ex for _, items in top for ex in items], num_clients, test_fraction, rng)


def _jsonl(
    path: str, num_clients: int, partition: str, alpha: float, test_fraction: float, rng: np.random.Generator
) -> tuple[str, list[ClientDataset]]:
    kind, examples, owners = jsonl.load_jsonl(path)
    if partition == "dirichlet" and kind != "classification":
        raise _no_labels(path)
    if partition != "natural":
        return kind, _pooled(examples, num_clients, partition, alpha, test_fraction, rng)
    by_client: dict[str, list[Example]] = {}
    for ex, owner in zip(examples, owners, strict=True):
        if owner is None:
            raise ValueError(f"partition='natural' needs a \"client\" field on every line of {path}")
        by_client.setdefault(owner, []).append(ex)
    # "most text": most characters (Shakespeare roles count words)
    sized = [(cid, sum(len(e.prompt) + len(e.target) for e in items), items) for cid, items in by_client.items()]
    top = _top_groups(sized, num_clients, f"clients with at least 2 lines in {path}")
    return kind, parts.natural(top, test_fraction)


def load_federated(
    task: str,
    num_clients: int,
    partition: str = "natural",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_per_client: int | None = None,
    max_test_per_client: int | None = None,
    chunk_words: int = 48,
    val_fraction: float = 0.0,
    max_val_per_client: int | None = None,
) -> FederatedDataset:
    """Split ``task`` over ``num_clients`` clients; the same arguments always give the same split.

    * ``"shakespeare"`` (LM): one client per (play, role); each example is about ``chunk_words`` words of the
      role's lines. ``natural`` takes the roles with the most text; ``iid`` deals their chunks out at random.
    * ``"tweets"`` (classification, 3 labels): ``iid`` or ``dirichlet`` (label skew with concentration
      ``alpha``); tweets carry no user ids, so there is no natural split.
    * ``"<path>.jsonl"``: see :mod:`fedprge.data.jsonl`; ``natural`` groups by the ``"client"`` field.

    Natural clients keep time order and test on their last ``test_fraction``; iid and dirichlet clients are
    shuffled first. Each client then keeps at most ``max_train_per_client`` / ``max_test_per_client``, after the
    last ``val_fraction`` of its training examples (at most ``max_val_per_client``) became its validation split.
    """
    limits = {
        "max_train_per_client": max_train_per_client,
        "max_test_per_client": max_test_per_client,
        "max_val_per_client": max_val_per_client,
    }
    check_range("val_fraction", val_fraction, "[0, 1)")
    _validate(task, num_clients, partition, alpha, seed, test_fraction, limits, chunk_words)
    rng = np.random.default_rng(seed)
    if task == "shakespeare":
        kind, clients = "lm", _shakespeare(num_clients, partition, test_fraction, chunk_words, rng)
    elif task == "tweets":
        if partition == "natural":
            raise ValueError(
                "partition='natural' is not available for task 'tweets': the tweets carry no user ids; "
                "use 'iid' or 'dirichlet'"
            )
        kind = "classification"
        clients = _pooled(tweets.tweet_examples(), num_clients, partition, alpha, test_fraction, rng)
    else:
        kind, clients = _jsonl(task, num_clients, partition, alpha, test_fraction, rng)
    clients = parts.carve_validation(clients, val_fraction, max_val_per_client)
    return FederatedDataset(task, kind, parts.cap(clients, max_train_per_client, max_test_per_client))
