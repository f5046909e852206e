"""PRGEStrategy: the server's half of the seed-and-scalar protocol, as a Flower Strategy.

The server never receives an adapter: it regenerates each client's directions from the seed derivation,
weights the client's projected gradients by its example count, merges them by seed and applies the result
with the same function the clients use (:func:`fedprge.federation.protocol.apply_coefficients`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprge.config import RunConfig
from fedprge.engine.estimator import StepRecord, replay
from fedprge.federation.protocol import GlobalState, RoundUpdate, SeedSpec, apply_coefficients, decode_grads, step_seeds

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
    failed: list[str] = field(default_factory=list)
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
        self.num_params = num_params
        self.zo = cfg.zo_config()
        self.spec = SeedSpec(cfg.seed, cfg.zo.q, fed.seed_scope, fed.pool_size if fed.downlink == "pool" else 0)
        self.b = torch.zeros(num_params)
        self.pool_coefs = np.zeros(self.spec.pool_size, dtype=np.float32)
        self.pool_index = {s: k for k, s in enumerate(self.spec.pool())} if self.spec.pool_size else {}
        self.history: dict[int, RoundUpdate] = {}
        self.synced = {c.partition: 0 for c in self.clients}  # last round whose update the node has applied
        self._start_b: torch.Tensor = self.b

    # --- Flower Strategy interface ---------------------------------------------------------------------------
    def summary(self) -> None:
        f = self.cfg.federation
        log.info(
            "PRGEStrategy: %d clients, fraction %.2f, %d local steps, q=%d, downlink=%s, seed scope=%s",
            len(self.clients),
            f.fraction,
            f.local_steps,
            self.zo.q,
            f.downlink,
            f.seed_scope,
        )

    def sample(self, rnd: int) -> list[Client]:
        """A deterministic sample of clients for round ``rnd`` (a function of the run seed and the round)."""
        f = self.cfg.federation
        k = min(len(self.clients), max(f.min_clients, int(np.ceil(f.fraction * len(self.clients)))))
        gen = np.random.default_rng([self.cfg.seed, rnd])
        return [self.clients[i] for i in sorted(gen.choice(len(self.clients), size=k, replace=False))]

    def state_for(self, partition: int, rnd: int, kind: str | None = None) -> GlobalState:
        kind = kind or self.cfg.federation.downlink
        if kind == "weights":
            return GlobalState(kind, b=self.b.clone())
        if kind == "pool":
            return GlobalState(kind, pool_coefs=self.pool_coefs.copy())
        missed = range(self.synced[partition] + 1, rnd)
        return GlobalState(kind, updates=[self.history[r] for r in missed])

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
    ) -> Iterable[Message]:
        out = []
        for c in clients if clients is not None else self.clients:
            msg = self._message(
                grid, c, server_round + 1, "evaluate", self.state_for(c.partition, server_round + 1, "weights")
            )
            msg.content["eval"] = ConfigRecord({"methods": list(methods)})
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

    def evaluation_rows(self, server_round: int, replies: Iterable[Message]) -> list[dict[str, float]]:
        rows = []
        for r in replies:
            c = self.by_node.get(r.metadata.src_node_id)
            if r.has_error() or c is None:
                log.warning(
                    "evaluation failed on node %s: %s",
                    r.metadata.src_node_id,
                    r.error.reason if r.has_error() else "unknown node",
                )
                continue
            self.synced[c.partition] = server_round
            rows.append(dict(r.content["metrics"]))
        return sorted(rows, key=lambda row: row["partition"])

    def aggregate(self, rnd: int, replies: list[Message]) -> RoundStats:
        """Reconstruct, weight and apply the clients' updates of round ``rnd``."""
        fed = self.cfg.federation
        stats = RoundStats(rnd, sampled=len(replies))
        good: list[tuple[Client, np.ndarray, Message]] = []
        for r in replies:
            c = self.by_node.get(r.metadata.src_node_id)
            if c is None:
                stats.failed.append(f"unknown node {r.metadata.src_node_id}")
                continue
            if r.has_error():
                stats.failed.append(f"client {c.partition}: {r.error.reason}")
                log.warning("round %d: client %d failed: %s", rnd, c.partition, r.error.reason)
                continue
            try:
                g = decode_grads(r.content["update"], fed.local_steps, self.zo.q)
            except (KeyError, ValueError) as e:
                stats.failed.append(f"client {c.partition}: {e}")
                log.warning("round %d: rejected reply of client %d: %s", rnd, c.partition, e)
                continue
            if not np.isfinite(g).all():
                stats.failed.append(f"client {c.partition}: non-finite projected gradients")
                log.warning("round %d: rejected client %d: non-finite projected gradients", rnd, c.partition)
                continue
            good.append((c, g, r))
        good.sort(key=lambda t: t[0].partition)
        stats.ok = len(good)
        if len(good) < fed.min_clients:
            stats.skipped = True
            log.warning(
                "round %d skipped: %d successful clients < min_clients=%d; global B unchanged",
                rnd,
                len(good),
                fed.min_clients,
            )
            self.history[rnd] = RoundUpdate(rnd, [], np.zeros(0, dtype=np.float32))
            return stats
        for c, _, _ in good:  # a node that answered has applied the catch-up we sent it
            self.synced[c.partition] = rnd - 1
        stats.train_loss = float(np.mean([float(r.content["metrics"]["train_loss"]) for _, _, r in good]))
        total = sum(c.num_examples for c, _, _ in good)
        merged: dict[int, np.float32] = {}
        for c, g, r in good:
            w = np.float32(c.num_examples / total)
            for step in range(fed.local_steps):
                for seed, gi in zip(step_seeds(self.spec, rnd, c.partition, step), g[step], strict=True):
                    merged[seed] = merged.get(seed, np.float32(0)) + w * gi
            if "check" in r.content:
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
