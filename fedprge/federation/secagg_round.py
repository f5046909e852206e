"""The server's side of a SecAgg+ round (``privacy.secagg``, see :mod:`fedprge.federation.secagg`): Flower's
``SecAggPlusWorkflow`` driven through a legacy-Strategy adapter, every stage message counted, the unmasked mean
applied like a plain round's."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_to_proto
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedprge.config import RunConfig
from fedprge.federation.replies import RoundStats
from fedprge.federation.secagg import PAYLOAD, WEIGHT, decode
from fedprge.federation.traffic import CountingGrid, Traffic

if TYPE_CHECKING:
    from fedprge.federation.strategy import PRGEStrategy

log = logging.getLogger("fedprge.server")


class StageGrid(CountingGrid):
    """The grid the workflow talks through: counts every stage message (:class:`CountingGrid`) and notes which
    nodes failed or did not answer a stage in time."""

    def __init__(self, grid: Grid, traffic: Traffic) -> None:
        super().__init__(grid, traffic)
        self.failed: dict[int, tuple[int, str]] = {}  # node -> (error code, reason) of its first error reply
        self.late: set[int] = set()

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for r in replies:
            node = to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                self.failed.setdefault(node, (r.error.code, r.error.reason))
        self.late |= set(to.values()) - answered
        return replies


class RoundAdapter(Strategy):
    """Flower's legacy Strategy contract for one SecAgg+ round: hands the workflow the round's train messages as
    FitIns and keeps the unmasked weighted mean it passes to ``aggregate_fit``."""

    def __init__(self, grid: Grid, msgs: list[Message], weight: dict[int, float]) -> None:
        self.grid, self.msgs, self.weight = grid, msgs, weight  # weight by node id
        self.mean: np.ndarray | None = None
        self.contributors: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [
            (
                GridClientProxy(m.metadata.dst_node_id, self.grid, run_id),
                FitIns(
                    Parameters([], ""),
                    {
                        PAYLOAD: recorddict_to_proto(m.content).SerializeToString(),
                        WEIGHT: float(self.weight[m.metadata.dst_node_id]),
                    },
                ),
            )
            for m in self.msgs
        ]

    def aggregate_fit(self, server_round, results, failures):
        """Called with every contributor's FitRes holding the same unmasked mean (never one client's values)."""
        self.contributors = [proxy.node_id for proxy, _ in results]
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def workflow(cfg: RunConfig, max_weight: float) -> SecAggPlusWorkflow:
    p = cfg.privacy
    return SecAggPlusWorkflow(
        p.secagg_shares,
        p.secagg_threshold,
        max_weight=max_weight,
        clipping_range=p.secagg_range,
        quantization_range=p.secagg_quantization,
        timeout=cfg.federation.timeout_s,
    )


def train_round(
    grid: Grid, strategy: PRGEStrategy, rnd: int, msgs: list[Message], traffic: Traffic
) -> tuple[RoundStats, int, int]:
    """Round ``rnd``'s training through SecAgg+, applied like a plain round; returns its stats and the uplink and
    downlink bytes of all its stage messages."""
    cfg, fed = strategy.cfg, strategy.cfg.federation
    sampled = [strategy.by_node[m.metadata.dst_node_id] for m in msgs]
    weight = {c.node_id: strategy.weight[c.partition] for c in sampled}
    counting = StageGrid(grid, traffic)
    adapter = RoundAdapter(grid, msgs, weight)
    context = LegacyContext(Context(grid.run.run_id, 0, {}, RecordDict(), {}), strategy=adapter)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    why = ""
    try:
        workflow(cfg, max(weight.values(), default=1.0))(counting, context)  # type: ignore[arg-type]
    except Exception as e:  # a malformed stage reply must not end the run (nor reach B)
        log.error("round %d: SecAgg+ failed: %s", rnd, e)
        why = f"SecAgg+ failed ({e})"
    if adapter.mean is None:
        adapter.contributors = []
        why = why or "SecAgg+ halted (too few clients left for privacy.secagg_threshold)"
    stats = RoundStats(rnd)
    done = set(adapter.contributors)
    for c in sampled:
        if c.node_id in done:
            continue
        if c.node_id in counting.failed:
            code, reason = counting.failed[c.node_id]
            stats.failed.append(f"client {c.partition}: {reason}")
            log.warning("round %d: client %d left SecAgg+: %s", rnd, c.partition, reason)
            if code != ErrorCode.NODE_UNAVAILABLE:  # it crashed: the next message must not assume its state
                stats.crashed.append(c.partition)
                strategy.synced[c.partition] = 0
        elif c.node_id in counting.late:
            stats.late.append(c.partition)
            log.warning("round %d: client %d missed a SecAgg+ stage within federation.timeout_s", rnd, c.partition)
    clients = [c for c in sampled if c.node_id in done]
    stats.ok = len(clients)
    if not why and len(clients) < fed.min_clients:
        why = f"{len(clients)} clients in the sum < federation.min_clients={fed.min_clients}"
    if not why:
        try:
            grads, stats.train_loss, stats.range_clipped = decode(cfg, adapter.mean, len(clients))
        except ValueError as e:
            why = str(e)
    if why:
        strategy.skip(stats, why)
    else:
        strategy.apply_mean(rnd, clients, grads)
        if stats.range_clipped:
            log.warning(
                "round %d: the clients clipped %.3g%% of their values (example-weighted) to privacy.secagg_range=%g",
                rnd,
                100 * stats.range_clipped,
                cfg.privacy.secagg_range,
            )
    return stats, counting.up, counting.down
