"""PRGEStrategy: the server's half of the seed-and-scalar protocol.

The server never receives an adapter: it regenerates each client's directions from the seed derivation,
weights the client's projected gradients by its example count, merges them by seed and applies the result
with the same functions the clients use (:mod:`fedprge.federation.updates`). ``server_app.run_federation``
drives it round by round; it is a plain class (Flower's ``Strategy.start`` loop is not used).

Rules for faulty and hostile clients (each rejection and clip is logged with the client's partition id and
counted in the round's row; a rejected reply never reaches the global B), each in the module that applies it:

* registration and aggregation weights (capped example counts): :mod:`fedprge.federation.registry`;
* train replies (unknown, stale, replayed, forged, duplicate, failed, malformed, late) and evaluation replies:
  :mod:`fedprge.federation.replies`;
* norm bound and ``federation.aggregation`` (mean / median / trimmed mean): :mod:`fedprge.federation.aggregation`;
* downlink forms and seed catch-up (``federation.catchup``): :mod:`fedprge.federation.downlink`;
* a round with fewer than ``federation.min_clients`` accepted replies is skipped (no retry): B is unchanged and
  the round's update is empty.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import cached_property

import numpy as np
import torch
from flwr.app import Message

from fedprge import privacy
from fedprge.config import RunConfig
from fedprge.federation import downlink, updates
from fedprge.federation.aggregation import apply_norm_bound, combine, merge_aligned
from fedprge.federation.protocol import GlobalState, RoundUpdate
from fedprge.federation.registry import Client, capped_weights
from fedprge.federation.replies import RoundStats, check_evaluation_reply, check_train_replies
from fedprge.federation.sampling import sample_round

log = logging.getLogger("fedprge.server")


class PRGEStrategy:
    """Holds the global B and turns client scalars into global updates."""

    def __init__(self, cfg: RunConfig, clients: list[Client], num_params: int) -> None:
        self.cfg = cfg
        fed = cfg.federation
        self.clients = sorted(clients, key=lambda c: c.partition)
        self.by_node = {c.node_id: c for c in self.clients}
        self.by_partition = {c.partition: c for c in self.clients}
        self.num_params = num_params
        self.zo = cfg.zo_config()
        self.spec = cfg.seed_spec()
        self.b = torch.zeros(num_params)
        self.pool_coefs = np.zeros(self.spec.pool_size, dtype=np.float32)
        self.pool_index = {s: k for k, s in enumerate(self.spec.pool())} if self.spec.pool_size else {}
        self.history: dict[int, RoundUpdate] = {}
        self.synced = {c.partition: 0 for c in self.clients}  # last round whose update the node has applied
        self.weight = capped_weights(self.clients, fed.max_count_ratio)  # aggregation weight per partition
        self._start_b: torch.Tensor = self.b  # B at the start of the round (the clients' replay origin)

    def admit(self, client: Client) -> None:
        """Take in a node registered between rounds (:func:`~fedprge.federation.registry.accept_newcomers`): it
        replaces its partition's old node, starts unsynced, and keeps the weight the partition already has."""
        old = self.by_partition.get(client.partition)
        if old is not None:
            self.by_node.pop(old.node_id, None)
        self.clients = sorted([c for c in self.clients if c is not old] + [client], key=lambda c: c.partition)
        self.by_node[client.node_id] = client
        self.by_partition[client.partition] = client
        self.synced[client.partition] = 0
        if client.partition not in self.weight:  # a late node: capped like the others (their weights stay)
            capped = capped_weights(self.clients, self.cfg.federation.max_count_ratio)
            self.weight[client.partition] = capped[client.partition]

    @cached_property
    def weights_bytes(self) -> int:
        """Payload bytes of the dense B (what a seed catch-up is compared with)."""
        return downlink.weights_bytes(self.num_params)

    def summary(self) -> None:
        f = self.cfg.federation
        log.info(
            "PRGEStrategy: %d clients, fraction %.2f, %d local steps, q=%d, downlink=%s, seed scope=%s, "
            "aggregation=%s, norm bound=%g",
            len(self.clients),
            f.fraction,
            f.local_steps,
            self.zo.q,
            f.downlink,
            f.seed_scope,
            f.aggregation,
            f.norm_bound,
        )

    def sample(self, rnd: int) -> list[Client]:
        """A deterministic sample for round ``rnd``: a function of the run seed, the round and ``clients``.

        Partitions that did not register are left out of the sample (the sample itself does not depend on who
        registered, so a resumed run samples as the uninterrupted one did)."""
        parts = sample_round(self.cfg, self.cfg.federation.clients, rnd)
        missing = [p for p in parts if p not in self.by_partition]
        if missing:
            log.warning("round %d: sampled clients %s are not registered", rnd, missing)
        return [self.by_partition[p] for p in parts if p in self.by_partition]

    def state_for(self, partition: int, rnd: int, kind: str | None = None) -> GlobalState:
        """The global state for a client about to run round ``rnd`` (catch-up rule in ``downlink.py``)."""
        fed = self.cfg.federation
        kind = kind or fed.downlink
        if kind == "weights":
            return GlobalState(kind, b=self.b.clone())
        if kind == "pool":
            return GlobalState(kind, pool_coefs=self.pool_coefs.copy())
        state = GlobalState(kind, updates=[self.history[r] for r in range(self.synced[partition] + 1, rnd)])
        if fed.catchup == "auto" and downlink.weights_cheaper(state, self.weights_bytes, fed.catchup_max_seeds):
            return GlobalState("weights", b=self.b.clone())
        return state

    def configure_train(self, server_round: int) -> list[Message]:
        """The train messages of round ``server_round``, one per sampled client."""
        self._start_b = self.b.clone()
        return [
            downlink.message(c.node_id, server_round, "train", self.state_for(c.partition, server_round))
            for c in self.sample(server_round)
        ]

    def configure_evaluate(
        self,
        server_round: int,
        methods: Iterable[str] = ("global",),
        clients: list[Client] | None = None,
        attempt: int = 0,
        save: str = "",
        validate: bool = False,
    ) -> list[Message]:
        """Evaluate messages for ``clients`` (default: all); ``attempt`` counts the retries of the same evaluation
        (a retried client gets the same state, so it computes the same numbers); ``save``: the run folder where
        each client keeps its ``export.personal`` B (empty: none); ``validate``: clients also report the validation
        loss of the global B."""
        sync = self.cfg.eval.sync
        return [
            downlink.evaluate_message(
                c.node_id,
                server_round + 1,
                self.state_for(c.partition, server_round + 1, None if sync else "weights"),
                list(methods),
                sync,
                attempt,
                save,
                validate,
            )
            for c in (clients if clients is not None else self.clients)
        ]

    def check_evaluation(
        self, server_round: int, r: Message, addressed: dict[str, int]
    ) -> tuple[Client | None, dict[str, float] | None, str | None]:
        """One evaluation reply checked (:func:`~fedprge.federation.replies.check_evaluation_reply`); an accepted
        reply syncs the client (``eval.sync``)."""
        c, row, why = check_evaluation_reply(self.by_node, r, addressed)
        if row is not None and self.cfg.eval.sync:
            self.synced[c.partition] = server_round
        return c, row, why

    def aggregate(self, rnd: int, replies: list[Message], sent: list[Message] | None = None) -> RoundStats:
        """Check, reconstruct, weight and apply the clients' updates of round ``rnd``.

        ``sent``: the round's train messages (their ids set by the grid); replies that answer none of them are
        rejected and sampled clients without a reply are counted late. Without it only ``group_id`` is checked."""
        fed = self.cfg.federation
        stats, good = check_train_replies(rnd, replies, sent, self.by_node, fed, self.zo.q)
        for p in stats.crashed:  # its per-node state may be gone: the next message must not assume it
            self.synced[p] = 0
        if len(good) < fed.min_clients:
            return self.skip(stats, f"{len(good)} accepted replies < federation.min_clients={fed.min_clients}")
        for a in good:  # a node that answered has applied the catch-up we sent it
            self.synced[a.client.partition] = rnd - 1
        stats.train_loss = float(np.mean([a.loss for a in good]))
        clients = [a.client for a in good]
        grads = apply_norm_bound(stats, clients, [a.grads for a in good], fed.norm_bound)
        merged = combine(stats, clients, grads, fed, self.spec, self.weight)
        for a in good:
            if "check" in a.reply.content:  # the raw scalars: what the client itself applied
                mine = updates.replay_client(self._start_b, self.spec, rnd, a.client.partition, a.grads, self.zo)
                stats.reconstruction_error = max(
                    np.nan_to_num(stats.reconstruction_error),
                    updates.relative_error(mine, a.reply.content["check"]["b"].numpy()),
                )
        self._apply(rnd, clients, merged)
        return stats

    def skip(self, stats: RoundStats, why: str) -> RoundStats:
        """Leave B unchanged for round ``stats.rnd`` (an empty update), logged with ``why``."""
        stats.skipped = True
        log.warning("round %d skipped: %s; global B unchanged", stats.rnd, why)
        self.history[stats.rnd] = RoundUpdate(stats.rnd, [], np.zeros(0, dtype=np.float32))
        return stats

    def apply_mean(self, rnd: int, clients: list[Client], mean: np.ndarray) -> None:
        """Apply the example-weighted mean (local_steps, q) scalars of ``clients`` (``seed_scope=round``: every
        client of the round used the same seeds, so the mean is the whole update; ``privacy.secagg``)."""
        for c in clients:  # they answered: each has applied the catch-up we sent it
            self.synced[c.partition] = rnd - 1
        self._apply(rnd, clients, merge_aligned(self.spec, rnd, clients[0].partition, mean))

    def _apply(self, rnd: int, clients: list[Client], merged: dict[int, np.float32]) -> None:
        """Central DP noise (``privacy.mode=central``), then round ``rnd``'s seed/coefficient update into B."""
        if self.cfg.privacy.mode == "central":  # DP-ZO: noise on the weighted mean of the clipped scalars
            w = [self.weight[c.partition] for c in clients]
            privacy.noise_aggregate(self.cfg, rnd, merged, max(w) / sum(w))
        update = RoundUpdate(rnd, list(merged), np.array(list(merged.values()), dtype=np.float32))
        self.history[rnd] = update
        if self.spec.pool_size:
            updates.add_to_pool(self.pool_coefs, self.pool_index, update)
            self.b = updates.pool_b(self.spec, self.pool_coefs, self.num_params, self.zo)
        else:
            self.b = updates.apply_round(self.b, update, self.zo)

    # --- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the run bit for bit (sampling and seeds are functions of the round)."""
        return {
            "b": self.b.clone(),
            "pool_coefs": torch.from_numpy(self.pool_coefs.copy()),
            "history": [
                (r, torch.tensor(u.seeds, dtype=torch.int64), torch.from_numpy(np.asarray(u.coefs, np.float32).copy()))
                for r, u in sorted(self.history.items())
            ],
            "weight": dict(self.weight),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; every node is then unsynced (its per-node state did not survive)."""
        if state["b"].numel() != self.num_params:
            raise ValueError(
                f"the checkpoint's B has {state['b'].numel()} entries; the adapters have {self.num_params}"
            )
        self.b = state["b"].clone()
        self.pool_coefs = state["pool_coefs"].numpy().copy()
        self.history = {int(r): RoundUpdate(int(r), s.tolist(), c.numpy().copy()) for r, s, c in state["history"]}
        for part, w in state["weight"].items():
            if part in self.weight and self.weight[part] != w:
                log.warning(
                    "client %d re-registered with weight %s; the run keeps its weight %s", part, self.weight[part], w
                )
        self.weight.update({int(p): w for p, w in state["weight"].items()})
        self.synced = {c.partition: 0 for c in self.clients}
