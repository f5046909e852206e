"""Which replies the server reads: the checks of train and evaluation replies, each refusal logged with its reason.

* A train reply is rejected when it comes from an unknown node, answers a message not sent in this round
  (``group_id`` of another round, an unknown ``reply_to`` or one addressed to another node: stale or replayed),
  duplicates an earlier reply of the same node, is a Flower error reply (a dropped client), lacks a field, has
  a scalar count other than ``local_steps x q``, a non-finite scalar or train loss, or a scalar whose magnitude
  exceeds ``federation.max_abs_grad`` (:func:`~fedprge.federation.defences.check_reply`). Seeds never travel up,
  so none can be forged: the server derives them.
* Sampled clients without a reply by ``federation.timeout_s`` are counted ``late``; a late reply is never read.
  The error reply the SuperLink writes for a node that stopped sending heartbeats (killed, offline) counts as that
  node's ``failed`` reply; like a crash it leaves the node unsynced and registered again once it is back
  (``server_app.rejoin``).
* An evaluation reply is refused when it is an error reply, comes from an unknown node or from another node than the
  one addressed (forged), has malformed metrics or reports another partition; ``evaluation.evaluate`` re-sends to
  such clients and reports those it could not evaluate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedprge.config import FederationSection
from fedprge.federation.defences import check_reply
from fedprge.federation.registry import Client

log = logging.getLogger("fedprge.server")


@dataclass
class RoundStats:
    """A round's outcome: who failed, was late, rejected, clipped or trimmed; the numbers of its ``rounds.csv`` row."""

    rnd: int
    ok: int = 0
    failed: list[str] = field(default_factory=list)  # error replies (dropped clients)
    crashed: list[int] = field(default_factory=list)  # failed partitions whose per-node state may be gone
    late: list[int] = field(default_factory=list)  # partitions without a reply by the deadline
    rejected: list[str] = field(default_factory=list)  # replies refused by a rule (see the module docstring)
    clipped: list[int] = field(default_factory=list)  # partitions scaled down by the norm bound
    trimmed: list[int] = field(default_factory=list)  # partitions cut by trimmed_mean (seed_scope=client)
    skipped: bool = False
    train_loss: float = float("nan")
    reconstruction_error: float = float("nan")
    range_clipped: float = 0.0  # privacy.secagg: weighted share of uplinked values the clients clipped to the range


class Accepted(NamedTuple):
    """A train reply that passed every check: its client, (local_steps, q) scalars and train loss."""

    client: Client
    grads: np.ndarray
    reply: Message
    loss: float


def _reject(stats: RoundStats, who: str, reason: str) -> None:
    stats.rejected.append(f"{who}: {reason}")
    log.warning("round %d: rejected the reply of %s: %s", stats.rnd, who, reason)


def sender(r: Message, sent: dict[str, int] | None) -> int:
    """The node reply ``r`` speaks for: its source, except for the error reply the SuperLink writes in its own name
    for a node it lost (``NODE_UNAVAILABLE`` once a killed node's heartbeats stop): the node it was sent to."""
    md = r.metadata
    if r.has_error() and md.src_node_id == SUPERLINK_NODE_ID and sent is not None:
        return sent.get(md.reply_to_message_id, md.src_node_id)
    return md.src_node_id


def stale(r: Message, rnd: int, sent: dict[str, int] | None) -> str | None:
    """Why reply ``r`` does not answer a train message of round ``rnd`` (None when it does).

    ``sent``: message id -> addressed node of the round's train messages (None: check ``group_id`` only)."""
    md = r.metadata
    if md.group_id != str(rnd):
        return f"it answers round {md.group_id!r}, not round {rnd} (stale or replayed)"
    if sent is not None:
        if md.reply_to_message_id not in sent:
            return f"it answers message {md.reply_to_message_id!r}, not sent in round {rnd} (replayed)"
        if sent[md.reply_to_message_id] != sender(r, sent):
            return f"it answers a message addressed to node {sent[md.reply_to_message_id]} (forged)"
    return None


def check_train_replies(
    rnd: int,
    replies: list[Message],
    sent: list[Message] | None,
    by_node: dict[int, Client],
    fed: FederationSection,
    q: int,
) -> tuple[RoundStats, list[Accepted]]:
    """The round's counts and its accepted train replies (the first per node), by partition.

    ``sent``: the round's train messages (their ids set by the grid); replies that answer none of them are
    rejected and sampled clients without a reply are counted late. Without it only ``group_id`` is checked."""
    expected = {m.metadata.message_id: m.metadata.dst_node_id for m in sent} if sent is not None else None
    stats = RoundStats(rnd)
    good: list[Accepted] = []
    answered: set[int] = set()
    for r in replies:
        node = sender(r, expected)
        c = by_node.get(node)
        if c is None:
            _reject(stats, f"unknown node {node}", "it is not registered")
            continue
        who = f"client {c.partition}"
        if (why := stale(r, rnd, expected)) is not None:
            _reject(stats, who, why)
            continue
        if node in answered:
            _reject(stats, who, "a second reply in the same round (the first one counts)")
            continue
        answered.add(node)
        if r.has_error():
            stats.failed.append(f"{who}: {r.error.reason}")
            log.warning("round %d: client %d failed: %s", rnd, c.partition, r.error.reason)
            # it crashed, or the SuperLink lost it (killed?): its state may be gone; a client that says it is
            # offline keeps its state
            if r.error.code != ErrorCode.NODE_UNAVAILABLE or r.metadata.src_node_id == SUPERLINK_NODE_ID:
                stats.crashed.append(c.partition)
            continue
        try:
            g, loss = check_reply(r.content, fed.local_steps, q, fed.max_abs_grad)
        except ValueError as e:
            _reject(stats, who, str(e))
            continue
        good.append(Accepted(c, g, r, loss))
    for m in sent or []:
        c = by_node.get(m.metadata.dst_node_id)
        if c is not None and m.metadata.dst_node_id not in answered:
            stats.late.append(c.partition)
            log.warning(
                "round %d: no reply from client %d within federation.timeout_s=%gs; a late reply is dropped",
                rnd,
                c.partition,
                fed.timeout_s,
            )
    good.sort(key=lambda a: a.client.partition)
    stats.ok = len(good)
    return stats, good


def check_evaluation_reply(
    by_node: dict[int, Client], r: Message, addressed: dict[str, int]
) -> tuple[Client | None, dict[str, float] | None, str | None]:
    """One evaluation reply: (client it answers, metric row, None) when accepted, else (client or None, None, why).

    ``addressed``: message id -> node of the evaluate messages sent; it names the node of an error reply (one made
    by the SuperLink for an unreachable node carries the SuperLink's id as source). Every refusal is logged."""
    node = addressed.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
    c = by_node.get(node)
    why = r.error.reason if r.has_error() else None
    if why is None and c is None:
        why = "unknown node"
    elif why is None and node != r.metadata.src_node_id:
        why = f"the reply comes from node {r.metadata.src_node_id} (forged)"
    if why is not None:
        log.warning("evaluation failed on node %s: %s", node, why)
        return c, None, why
    try:
        row = {str(k): float(v) for k, v in r.content["metrics"].items()}
    except (KeyError, TypeError, ValueError) as e:
        why = f"malformed metrics ({e})"
    else:
        if row.get("partition") != c.partition:
            why = f"it reports partition {row.get('partition')}"
    if why is not None:
        log.warning("evaluation of client %d rejected: %s", c.partition, why)
        return c, None, why
    return c, row, None
