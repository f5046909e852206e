"""Evaluating clients so that none is lost silently: deadlines that follow progress, retries, named misses."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any, NamedTuple

from flwr.serverapp import Grid

from fedprge.federation.registry import Client
from fedprge.federation.strategy import PRGEStrategy
from fedprge.federation.traffic import Traffic

log = logging.getLogger("fedprge.server")


class Evaluated(NamedTuple):
    """An evaluation's accepted metric rows (one per client, by partition) and the clients it could not evaluate."""

    rows: list[dict[str, float]]
    missing: list[dict[str, Any]]  # {"partition": p, "reason": why}, by partition


def evaluate(
    grid: Grid,
    strategy: PRGEStrategy,
    rnd: int,
    methods: list[str],
    traffic: Traffic,
    clients: list[Client],
    save: str = "",
    validate: bool = False,
) -> Evaluated:
    """Evaluate ``clients`` on the global state of round ``rnd``; no client is lost without a reason
    (``validate``: each row also has ``global_val_loss``, the global B's loss on the client's validation split).

    The wait follows progress: it ends when every client has an accepted reply, or when no reply at all came for
    ``eval.timeout_s``. A client without an accepted reply (an error reply, a refused one, or none in that time)
    is sent its message again, up to ``eval.retries`` times; a reply to any of its attempts counts, the first
    one only. The checks of a reply are :meth:`PRGEStrategy.check_evaluation`'s."""
    ev, t0 = strategy.cfg.eval, time.monotonic()
    todo = {c.partition: c for c in clients}
    by_node = {c.node_id: c.partition for c in clients}
    tries: Counter[int] = Counter()
    live: dict[int, set[str]] = defaultdict(set)  # partition -> ids of its messages still without a reply
    addressed: dict[str, int] = {}  # message id -> the node it was sent to
    rows: dict[int, dict[str, float]] = {}
    why: dict[int, str] = {}
    gave_up: set[int] = set()
    resend: list[int] = []

    def failed(p: int, reason: str) -> None:
        why[p] = reason
        if tries[p] <= ev.retries:
            log.warning(
                "evaluation at round %d: no accepted reply from client %d (%s); sending it again (try %d of %d)",
                rnd,
                p,
                reason,
                tries[p] + 1,
                ev.retries + 1,
            )
            resend.append(p)
        else:
            gave_up.add(p)

    def send(parts: list[int]) -> None:
        for attempt in sorted({tries[p] for p in parts}):
            group = [todo[p] for p in parts if tries[p] == attempt]
            msgs = list(strategy.configure_evaluate(rnd, methods, group, attempt=attempt, save=save, validate=validate))
            pushed = set(grid.push_messages(msgs))
            traffic.add("evaluate", "down", [m for m in msgs if m.metadata.message_id in pushed])
            for m in msgs:
                p, mid = by_node[m.metadata.dst_node_id], m.metadata.message_id
                tries[p] += 1
                if mid in pushed:
                    live[p].add(mid)
                    addressed[mid] = m.metadata.dst_node_id
                else:
                    failed(p, "the grid did not accept the message")

    resend = sorted(todo)
    last = time.monotonic()
    while waiting := [p for p in todo if p not in rows and p not in gave_up]:
        if resend:
            parts, resend = resend, []
            send(parts)
            last = time.monotonic()
        ids = {mid for p in waiting for mid in live[p]}
        replies = list(grid.pull_messages(ids)) if ids else []
        traffic.add("evaluate", "up", replies)
        for r in replies:
            mid = r.metadata.reply_to_message_id
            p = by_node.get(addressed.get(mid, -1))
            if p is None or mid not in live[p]:
                log.warning("evaluation at round %d: ignored a reply to message %r, not awaited", rnd, mid)
                continue
            live[p].discard(mid)
            last = time.monotonic()
            if p in rows:  # a second reply (to an earlier attempt): the first one counts
                continue
            _, row, reason = strategy.check_evaluation(rnd, r, addressed)
            if row is not None:
                rows[p] = row
            elif not live[p]:  # no other attempt of this client is still pending
                failed(p, str(reason))
        if not replies and not resend:
            if time.monotonic() - last > ev.timeout_s:
                for p in waiting:
                    if live[p]:
                        failed(
                            p,
                            f"no reply after {tries[p]} {'try' if tries[p] == 1 else 'tries'} "
                            f"(eval.timeout_s={ev.timeout_s:g})",
                        )
                last = time.monotonic()
            else:
                time.sleep(0.1)
    missing = [{"partition": p, "reason": why[p]} for p in sorted(gave_up)]
    log.info("evaluation at round %d: %d of %d clients in %.1f s", rnd, len(rows), len(todo), time.monotonic() - t0)
    if missing:
        log.warning(
            "evaluation at round %d covers %d of %d clients; missing: %s",
            rnd,
            len(rows),
            len(todo),
            "; ".join(f"client {m['partition']} ({m['reason']})" for m in missing),
        )
    return Evaluated([rows[p] for p in sorted(rows)], missing)
