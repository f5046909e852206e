"""PRGEStrategy: the server's half of the seed-and-scalar protocol, as a Flower Strategy.

The server never receives an adapter: it regenerates each client's directions from the seed derivation,
weights the client's projected gradients by its example count, merges them by seed and applies the result
with the same function the clients use (:func:`fedprge.federation.protocol.apply_coefficients`).

Rules for faulty and hostile clients (each rejection and clip is logged with the client's partition id and
counted in the round's row; a rejected reply never reaches the global B; the numeric rules are in ``defences.py``):

* Registration (``server_app.register``): a node must report a partition in ``[0, clients)`` not already taken,
  ``num_examples >= 1`` and the adapter size of the majority. A client's aggregation weight is its registered
  example count capped at ``federation.max_count_ratio`` x the lower median of all registered counts (counts in
  train replies are ignored).
* A train reply is rejected when it comes from an unknown node, answers a message not sent in this round
  (``group_id`` of another round, an unknown ``reply_to`` or one addressed to another node: stale or replayed),
  duplicates an earlier reply of the same node, is a Flower error reply (a dropped client), lacks a field, has
  a scalar count other than ``local_steps x q``, a non-finite scalar or train loss, or a scalar whose magnitude
  exceeds ``federation.max_abs_grad``. Seeds never travel up, so none can be forged: the server derives them.
* Sampled clients without a reply by ``federation.timeout_s`` are counted ``late``; a late reply is never read.
* An evaluation reply is refused when it is an error reply, comes from an unknown node or from another node than the
  one addressed (forged), has malformed metrics or reports another partition (:meth:`PRGEStrategy.check_evaluation`);
  ``evaluation.evaluate`` re-sends to such clients and reports those it could not evaluate.
* Norm bound: a client whose projected-gradient vector has an L2 norm above ``federation.norm_bound`` x the lower
  median norm of the round's accepted clients is scaled down to that norm (with one client there is no reference).
* ``federation.aggregation``: ``mean`` is the example-weighted mean. With ``seed_scope=round`` every client of a
  round uses the same seeds, so ``median`` / ``trimmed_mean`` act coordinate-wise on the aligned scalars (one
  value per seed, unweighted; ``trimmed_mean`` cuts ``floor(trim_fraction x n)`` values at each end). With
  ``seed_scope=client`` the directions differ per client and only norms are comparable: ``trimmed_mean`` drops the
  ``floor(trim_fraction x n)`` clients with the smallest and the largest norms, ``median`` clips every client to
  the median norm; both then take the weighted mean. Every result is a seed/coefficient list.
* A round with fewer than ``federation.min_clients`` accepted replies is skipped (no retry): B is unchanged and
  the round's update is empty.

Catch-up (``downlink=seeds``): a client gets the seed lists of every round since its last sync, or the dense B
when that is cheaper (``federation.catchup=auto``: when the seed record is at least as many bytes as B, or the
replay exceeds ``catchup_max_seeds`` directions). After a resume, and after a client's ClientApp failed with
anything but ``NODE_UNAVAILABLE`` (an offline node keeps its state), the node counts as unsynced (synced round 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprge.config import RunConfig
from fedprge.engine.estimator import StepRecord, replay
from fedprge.federation.defences import (
    bound_norms,
    check_reply,
    clip_to_median,
    coordinate_rule,
    extreme_norms,
    lower_median,
)
from fedprge.federation.protocol import (
    GlobalState,
    RoundUpdate,
    SeedSpec,
    apply_coefficients,
    content_bytes,
    step_seeds,
)
from fedprge.federation.sampling import sample_round

log = logging.getLogger("fedprge.server")


@dataclass
class Client:
    node_id: int
    partition: int
    num_examples: int


@dataclass
class RoundStats:
    rnd: int
    sampled: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)  # error replies (dropped clients)
    late: list[int] = field(default_factory=list)  # partitions without a reply by the deadline
    rejected: list[str] = field(default_factory=list)  # replies refused by a rule (see the module docstring)
    clipped: list[int] = field(default_factory=list)  # partitions scaled down by the norm bound
    trimmed: list[int] = field(default_factory=list)  # partitions cut by trimmed_mean (seed_scope=client)
    skipped: bool = False
    train_loss: float = float("nan")
    reconstruction_error: float = float("nan")


class PRGEStrategy(Strategy):
    """Holds the global B and turns client scalars into global updates."""

    def __init__(self, cfg: RunConfig, clients: list[Client], num_params: int) -> None:
        self.cfg = cfg
        fed = cfg.federation
        self.clients = sorted(clients, key=lambda c: c.partition)
        self.by_node = {c.node_id: c for c in self.clients}
        self.by_partition = {c.partition: c for c in self.clients}
        self.num_params = num_params
        self.zo = cfg.zo_config()
        self.spec = SeedSpec(cfg.seed, cfg.zo.q, fed.seed_scope, fed.pool_size if fed.downlink == "pool" else 0)
        self.b = torch.zeros(num_params)
        self.pool_coefs = np.zeros(self.spec.pool_size, dtype=np.float32)
        self.pool_index = {s: k for k, s in enumerate(self.spec.pool())} if self.spec.pool_size else {}
        self.history: dict[int, RoundUpdate] = {}
        self.synced = {c.partition: 0 for c in self.clients}  # last round whose update the node has applied
        self.weight = self._capped_counts()  # aggregation weight (example count) per partition
        self._start_b: torch.Tensor = self.b
        self._weights_bytes: int | None = None

    def _capped_counts(self) -> dict[int, float]:
        """Registered example counts, capped at ``max_count_ratio`` x their lower median."""
        if not self.clients:
            return {}
        ratio = self.cfg.federation.max_count_ratio
        cap = ratio * lower_median(c.num_examples for c in self.clients)
        weight = {}
        for c in self.clients:
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

    # --- Flower Strategy interface ---------------------------------------------------------------------------
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
        """The global state for a client about to run round ``rnd`` (see the module docstring on catch-up)."""
        kind = kind or self.cfg.federation.downlink
        if kind == "weights":
            return GlobalState(kind, b=self.b.clone())
        if kind == "pool":
            return GlobalState(kind, pool_coefs=self.pool_coefs.copy())
        missed = range(self.synced[partition] + 1, rnd)
        state = GlobalState(kind, updates=[self.history[r] for r in missed])
        if self.cfg.federation.catchup == "auto" and self._weights_cheaper(state):
            return GlobalState("weights", b=self.b.clone())
        return state

    def _weights_cheaper(self, state: GlobalState) -> bool:
        fed = self.cfg.federation
        n_seeds = sum(len(u.seeds) for u in state.updates)
        if fed.catchup_max_seeds and n_seeds > fed.catchup_max_seeds:
            return True
        if self._weights_bytes is None:
            dense = ArrayRecord(array_dict={"b": Array(np.zeros(self.num_params, dtype=np.float32))})
            self._weights_bytes = content_bytes(RecordDict({"state": dense}))
        # a seed entry alone takes 8 bytes, so a long list needs no serializing to lose
        return 8 * n_seeds >= self._weights_bytes or (
            content_bytes(RecordDict({"state": state.to_record()})) >= self._weights_bytes
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None, grid: Grid
    ) -> Iterable[Message]:
        self._start_b = self.b.clone()
        return [
            self._message(grid, c, server_round, "train", self.state_for(c.partition, server_round))
            for c in self.sample(server_round)
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        stats = self.aggregate(server_round, list(replies))
        return ArrayRecord(array_dict={}), MetricRecord({"ok": stats.ok, "train_loss": stats.train_loss})

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        config: ConfigRecord | None,
        grid: Grid,
        methods: Iterable[str] = ("global",),
        clients: list[Client] | None = None,
        attempt: int = 0,
        save: str = "",
    ) -> Iterable[Message]:
        """Evaluate messages for ``clients`` (default: all); ``attempt`` counts the retries of the same evaluation
        (a retried client gets the same state, so it computes the same numbers); ``save``: the run folder where
        each client keeps its ``export.personal`` B (empty: none)."""
        sync, out = self.cfg.eval.sync, []
        for c in clients if clients is not None else self.clients:
            state = self.state_for(c.partition, server_round + 1, None if sync else "weights")
            msg = self._message(grid, c, server_round + 1, "evaluate", state)
            fields = {"methods": list(methods), "sync": sync, "attempt": attempt}
            msg.content["eval"] = ConfigRecord({**fields, "save": save} if save else fields)
            out.append(msg)
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = self.evaluation_rows(server_round, replies)
        keys = sorted({k for r in rows for k in r if k not in ("partition", "num_examples")})
        return MetricRecord({k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}) if rows else None

    # --- the protocol ----------------------------------------------------------------------------------------
    def _message(self, grid: Grid, c: Client, rnd: int, kind: str, state: GlobalState) -> Message:
        content = RecordDict(
            {"round": ConfigRecord({"round": rnd, "downlink": state.kind}), "state": state.to_record()}
        )
        return Message(content, dst_node_id=c.node_id, message_type=kind, group_id=str(rnd))

    def evaluation_rows(
        self, server_round: int, replies: Iterable[Message], sent: list[Message] | None = None
    ) -> list[dict[str, float]]:
        """Per-client metric rows of the accepted evaluation replies (the first per client), by partition.
        ``sent`` (the evaluate messages) names the node of an error reply: one made by the SuperLink for an
        unreachable node carries the SuperLink's id as source."""
        addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in sent or []}
        rows: dict[int, dict[str, float]] = {}
        for r in replies:
            c, row, _ = self.check_evaluation(server_round, r, addressed)
            if c is not None and row is not None:
                rows.setdefault(c.partition, row)
        return [rows[p] for p in sorted(rows)]

    def check_evaluation(
        self, server_round: int, r: Message, addressed: dict[str, int]
    ) -> tuple[Client | None, dict[str, float] | None, str | None]:
        """One evaluation reply: (client it answers, metric row, None) when accepted, else (client or None, None,
        why). ``addressed``: message id -> node of the evaluate messages sent. An accepted reply syncs the client
        (``eval.sync``); every refusal is logged."""
        node = addressed.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        c = self.by_node.get(node)
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
        if self.cfg.eval.sync:
            self.synced[c.partition] = server_round
        return c, row, None

    def _reject(self, stats: RoundStats, who: str, reason: str) -> None:
        stats.rejected.append(f"{who}: {reason}")
        log.warning("round %d: rejected the reply of %s: %s", stats.rnd, who, reason)

    def _stale(self, r: Message, rnd: int, sent: dict[str, int] | None) -> str | None:
        """Why reply ``r`` does not answer a train message of round ``rnd`` (None when it does)."""
        md = r.metadata
        if md.group_id != str(rnd):
            return f"it answers round {md.group_id!r}, not round {rnd} (stale or replayed)"
        if sent is not None:
            if md.reply_to_message_id not in sent:
                return f"it answers message {md.reply_to_message_id!r}, not sent in round {rnd} (replayed)"
            if sent[md.reply_to_message_id] != md.src_node_id:
                return f"it answers a message addressed to node {sent[md.reply_to_message_id]} (forged)"
        return None

    def aggregate(self, rnd: int, replies: list[Message], sent: list[Message] | None = None) -> RoundStats:
        """Check, reconstruct, weight and apply the clients' updates of round ``rnd``.

        ``sent``: the round's train messages (their ids set by the grid); replies that answer none of them are
        rejected and sampled clients without a reply are counted late. Without it only ``group_id`` is checked."""
        fed = self.cfg.federation
        expected = {m.metadata.message_id: m.metadata.dst_node_id for m in sent} if sent is not None else None
        stats = RoundStats(rnd, sampled=len(sent) if sent is not None else len(replies))
        good: list[tuple[Client, np.ndarray, Message, float]] = []
        answered: set[int] = set()
        for r in replies:
            node = r.metadata.src_node_id
            c = self.by_node.get(node)
            if c is None:
                self._reject(stats, f"unknown node {node}", "it is not registered")
                continue
            who = f"client {c.partition}"
            if (why := self._stale(r, rnd, expected)) is not None:
                self._reject(stats, who, why)
                continue
            if node in answered:
                self._reject(stats, who, "a second reply in the same round (the first one counts)")
                continue
            answered.add(node)
            if r.has_error():
                stats.failed.append(f"{who}: {r.error.reason}")
                log.warning("round %d: client %d failed: %s", rnd, c.partition, r.error.reason)
                if r.error.code != ErrorCode.NODE_UNAVAILABLE:  # it crashed: its per-node state may be gone
                    self.synced[c.partition] = 0
                continue
            try:
                g, loss = check_reply(r.content, fed.local_steps, self.zo.q, fed.max_abs_grad)
            except ValueError as e:
                self._reject(stats, who, str(e))
                continue
            good.append((c, g, r, loss))
        if sent is not None:
            for m in sent:
                c = self.by_node.get(m.metadata.dst_node_id)
                if c is not None and m.metadata.dst_node_id not in answered:
                    stats.late.append(c.partition)
                    log.warning(
                        "round %d: no reply from client %d within federation.timeout_s=%gs; a late reply is dropped",
                        rnd,
                        c.partition,
                        fed.timeout_s,
                    )
        good.sort(key=lambda t: t[0].partition)
        stats.ok = len(good)
        if len(good) < fed.min_clients:
            stats.skipped = True
            log.warning(
                "round %d skipped: %d accepted replies < federation.min_clients=%d; global B unchanged",
                rnd,
                len(good),
                fed.min_clients,
            )
            self.history[rnd] = RoundUpdate(rnd, [], np.zeros(0, dtype=np.float32))
            return stats
        for c, _, _, _ in good:  # a node that answered has applied the catch-up we sent it
            self.synced[c.partition] = rnd - 1
        stats.train_loss = float(np.mean([loss for _, _, _, loss in good]))
        clients = [c for c, _, _, _ in good]
        grads = self._bound_norms(stats, clients, [g for _, g, _, _ in good])
        merged = self._combine(stats, clients, grads)
        for c, g, r, _ in good:
            if "check" in r.content:  # the raw scalars: what the client itself applied
                stats.reconstruction_error = max(
                    np.nan_to_num(stats.reconstruction_error),
                    self.reconstruction_error(c, g, rnd, r.content["check"]["b"].numpy()),
                )
        seeds, coefs = list(merged), np.array(list(merged.values()), dtype=np.float32)
        self.history[rnd] = RoundUpdate(rnd, seeds, coefs)
        scale = self.zo.lr / self.zo.q
        if self.spec.pool_size:
            for s, v in zip(seeds, coefs, strict=True):
                self.pool_coefs[self.pool_index[s]] += v
            self.b = apply_coefficients(
                torch.zeros(self.num_params), self.spec.pool(), self.pool_coefs, scale, self.zo.distribution
            )
        else:
            self.b = apply_coefficients(self.b, seeds, coefs, scale, self.zo.distribution)
        return stats

    def _bound_norms(self, stats: RoundStats, clients: list[Client], grads: list[np.ndarray]) -> list[np.ndarray]:
        """Scale down every client whose norm exceeds ``norm_bound`` x the round's lower median norm."""
        bound = self.cfg.federation.norm_bound
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

    def _combine(self, stats: RoundStats, clients: list[Client], grads: list[np.ndarray]) -> dict[int, np.float32]:
        """The round's aggregated update as {seed: coefficient} (rules in the module docstring)."""
        fed = self.cfg.federation
        n, rnd = len(clients), stats.rnd
        k = int(fed.trim_fraction * n) if fed.aggregation == "trimmed_mean" else 0
        merged: dict[int, np.float32] = {}
        if fed.aggregation != "mean" and self.spec.scope == "round":  # aligned: one value per seed
            coord = coordinate_rule(grads, fed.aggregation, k)
            for step in range(fed.local_steps):
                for seed, v in zip(step_seeds(self.spec, rnd, clients[0].partition, step), coord[step], strict=True):
                    merged[seed] = merged.get(seed, np.float32(0)) + v
            return merged
        if fed.aggregation == "trimmed_mean" and k:  # per-client directions: trim by norm
            cut = extreme_norms(grads, k, [c.partition for c in clients])
            stats.trimmed = sorted(clients[i].partition for i in cut)
            log.info("round %d: trimmed_mean left out clients %s (extreme norms)", rnd, stats.trimmed)
            keep = [i for i in range(n) if i not in cut]
            clients, grads = [clients[i] for i in keep], [grads[i] for i in keep]
        elif fed.aggregation == "median":  # per-client directions: every client at most the median norm
            grads = clip_to_median(grads)
        total = sum(self.weight[c.partition] for c in clients)
        for c, g in zip(clients, grads, strict=True):
            w = np.float32(self.weight[c.partition] / total)
            for step in range(fed.local_steps):
                for seed, gi in zip(step_seeds(self.spec, rnd, c.partition, step), g[step], strict=True):
                    merged[seed] = merged.get(seed, np.float32(0)) + w * gi
        return merged

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

    def client_state(self, c: Client, g: np.ndarray, rnd: int) -> torch.Tensor:
        """The server's reconstruction of client ``c``'s B after its local steps of round ``rnd``."""
        records = [
            StepRecord(tuple(step_seeds(self.spec, rnd, c.partition, t)), tuple(g[t].tolist()))
            for t in range(g.shape[0])
        ]
        return replay(self._start_b, records, self.zo.lr, self.zo.distribution)

    def reconstruction_error(self, c: Client, g: np.ndarray, rnd: int, client_b: np.ndarray) -> float:
        """Relative L2 distance between the server's reconstruction and the B the client reported."""
        mine = self.client_state(c, g, rnd)
        theirs = torch.from_numpy(client_b)
        return float((mine - theirs).norm() / theirs.norm().clamp(min=1e-30))
