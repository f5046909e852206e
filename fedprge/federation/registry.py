"""Who is in the federation: the nodes accepted at registration and how much each one's update weighs.

Registration: a node must report a partition in ``[0, clients)`` not already taken, ``num_examples >= 1`` and the
adapter size of the majority. A client's aggregation weight is its registered example count capped at
``federation.max_count_ratio`` x the lower median of all registered counts (counts in train replies are ignored).
A node that connects later (a restarted or a late SuperNode) registers between rounds by the same rules; it may take
over a partition only when that partition's node is no longer connected (:func:`accept_newcomers`). A node that
crashed registers again under its own id (a restarted process has lost the run's config).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from flwr.app import Message

from fedprge.config import RunConfig
from fedprge.federation.defences import lower_median

log = logging.getLogger("fedprge.server")


@dataclass
class Client:
    node_id: int
    partition: int
    num_examples: int


def accept_registrations(replies: list[Message], cfg: RunConfig) -> tuple[list[Client], int]:
    """The valid registrations (by partition) and the adapter size; every refusal is logged."""
    infos = _infos(replies)
    if not infos:
        raise RuntimeError("no node registered; see the client errors above")
    sizes = Counter(info["num_params"] for _, info in infos)
    num_params, votes = sizes.most_common(1)[0]
    if len(sizes) > 1 and 2 * votes <= len(infos):
        raise RuntimeError(f"registered nodes disagree on the adapter size: {sorted(sizes)} (no majority)")
    clients, seen = [], set()
    for node, info in infos:
        part, n = info["partition"], info["num_examples"]
        if info["num_params"] != num_params:
            why = f"adapter size {info['num_params']} differs from the majority's {num_params}"
        elif not 0 <= part < cfg.federation.clients:
            why = f"partition={part} is outside [0, federation.clients={cfg.federation.clients})"
        elif part in seen:
            why = f"partition {part} is already taken"
        elif n < 1:
            why = f"num_examples={n} must be >= 1"
        else:
            seen.add(part)
            clients.append(Client(node, part, n))
            continue
        log.warning("node %s rejected at registration: %s", node, why)
    if not clients:
        raise RuntimeError("no node registered; see the client errors above")
    return sorted(clients, key=lambda c: c.partition), num_params


def _infos(replies: list[Message]) -> list[tuple[int, dict[str, int]]]:
    """(node, info record) of every well-formed registration reply; error replies and malformed ones are logged."""
    infos = []
    for r in replies:
        node = r.metadata.src_node_id
        if r.has_error():
            log.warning("node %s failed to register: %s", node, r.error.reason)
            continue
        try:
            info = {k: r.content["info"][k] for k in ("partition", "num_examples", "num_params")}
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in info.values()):
                raise ValueError(f"non-integer values {info}")
        except (KeyError, TypeError, ValueError) as e:
            log.warning("node %s rejected at registration: malformed info record (%s)", node, e)
            continue
        infos.append((node, info))
    return infos


def accept_newcomers(
    replies: list[Message], cfg: RunConfig, num_params: int, holders: dict[int, int], online: set[int]
) -> tuple[list[Client], set[int]]:
    """The registrations of nodes that connected after the start, and the nodes to ask again next round.

    ``holders``: partition -> node id of the run's clients; ``online``: the nodes connected now. A newcomer needs the
    run's adapter size, a partition in range and ``num_examples >= 1``; it takes over a partition whose node is no
    longer connected (a restarted SuperNode gets a new node id), and waits while that node still is (the SuperLink
    notices a dead node only after its heartbeats stop, up to a minute). Every refusal is logged."""
    clients: list[Client] = []
    retry: set[int] = set()
    for node, info in _infos(replies):
        part, n = info["partition"], info["num_examples"]
        holder = holders.get(part)
        if info["num_params"] != num_params:
            why = f"adapter size {info['num_params']} differs from the run's {num_params}"
        elif not 0 <= part < cfg.federation.clients:
            why = f"partition={part} is outside [0, federation.clients={cfg.federation.clients})"
        elif n < 1:
            why = f"num_examples={n} must be >= 1"
        elif any(c.partition == part for c in clients) or holder not in (None, node) and holder in online:
            retry.add(node)
            why = f"partition {part} is held by a connected node; asking again next round"
        else:
            clients.append(Client(node, part, n))
            was = {None: "joined late", node: "again"}.get(holder, f"replaces node {holder}, no longer connected")
            log.warning("node %s registered as client %d between rounds (%s)", node, part, was)
            continue
        log.warning("node %s rejected at registration: %s", node, why)
    return clients, retry


def capped_weights(clients: list[Client], ratio: float) -> dict[int, float]:
    """Aggregation weight by partition: the registered example count, capped at ``ratio`` x their lower median."""
    if not clients:
        return {}
    cap = ratio * lower_median(c.num_examples for c in clients)
    weight = {}
    for c in clients:
        weight[c.partition] = min(c.num_examples, cap)
        if c.num_examples > cap:
            log.warning(
                "client %d registered %d examples > federation.max_count_ratio=%g x the median count; "
                "its aggregation weight is capped at %g",
                c.partition,
                c.num_examples,
                ratio,
                cap,
            )
    return weight
