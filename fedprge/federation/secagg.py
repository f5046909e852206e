"""SecAgg+ on a round's scalars (``privacy.secagg``): Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod``.

With ``seed_scope=round`` every client of a round uses the same directions, so the update needs only the weighted
mean of the clients' scalars; SecAgg+ gives the server that mean and never one client's values. fedprge writes no
protocol: the workflow runs the four stages (setup, share keys, collect masked vectors, unmask) through the grid,
the mod answers them on the client, and this module only adapts the two ends.

* Down: the round's train message (the same records as without SecAgg+, any downlink form) rides serialized in
  ``FitIns.config["fedprge.train"]`` with the client's aggregation weight (``weight``: its capped registered
  count); Flower's legacy ``FitIns`` cannot hold the seed state's lists itself.
* Up (what the mod masks): one float vector [the local_steps x q projected gradients, loss x c / LOSS_RANGE, c x
  the share of this vector the client clipped]. The train loss and the clip count ride inside it, so the server
  learns only their weighted means; nothing else a client computed is in its reply.
* Fixed point: the client clips every entry to [-c, c] (c = ``privacy.secagg_range``), counts and logs what it
  clipped (Flower would clip silently); Flower weights it by weight / max_weight, rounds to 1/Q and quantizes it
  with stochastic rounding to Q = ``privacy.secagg_quantization`` levels over [-c, c]. Each of the n summed
  clients adds < 2c/Q of rounding and its weight's rounding < c/Q, so a coefficient differs from the plain run's
  weighted mean by at most ``tolerance`` = 3 n c / Q (2c/Q with equal weights); sums stay below the modulus 2**32
  while n Q < 2**32 (``config_rules``).
* Drop-outs: a client that fails or is late in a stage leaves the round and SecAgg+ removes its masks (up to
  ``privacy.secagg_threshold``); when the protocol halts or fails, the round is skipped (B unchanged) and counted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedprge.config import RunConfig
from fedprge.engine import rng
from fedprge.engine.seeds import SECAGG_ROUNDING
from fedprge.federation.replies import RoundStats
from fedprge.federation.traffic import CountingGrid, Traffic

if TYPE_CHECKING:
    from fedprge.federation.strategy import PRGEStrategy

log = logging.getLogger("fedprge.server")
client_log = logging.getLogger("fedprge.client")

PAYLOAD, WEIGHT, FITINS = "fedprge.train", "weight", "fitins.config"
LOSS_RANGE = 100.0  # a train loss up to this many nats fits the range whatever c is


def clients_per_round(cfg: RunConfig) -> int:
    from fedprge.federation.sampling import sample_round

    return len(sample_round(cfg, cfg.federation.clients, 1))


def tolerance(cfg: RunConfig, n: int | None = None) -> float:
    """The largest difference of an aggregated coefficient from the plain weighted mean, with n clients summed."""
    p = cfg.privacy
    return 3 * (n or clients_per_round(cfg)) * p.secagg_range / p.secagg_quantization


def report(cfg: RunConfig) -> dict[str, object]:
    """The summary's ``secagg`` block: the protocol's settings and the encoding tolerance."""
    p = cfg.privacy
    return {
        "protocol": "Flower SecAggPlusWorkflow + secaggplus_mod",
        "range": p.secagg_range,
        "quantization": p.secagg_quantization,
        "shares": p.secagg_shares,
        "threshold": p.secagg_threshold,
        "clients_per_round": clients_per_round(cfg),
        "tolerance_per_coefficient": tolerance(cfg),
    }


# --- client ------------------------------------------------------------------------------------------------------
def client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a SecAgg+ stage message goes through Flower's ``secaggplus_mod``; any other passes unchanged."""
    if RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, context)

    def train(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if reply.has_error():  # e.g. an injected drop-out: it leaves the round, SecAgg+ removes its masks
            raise _Left(reply)
        return reply

    outside = np.random.get_state()  # masked_reply seeds numpy's global generator for Flower's rounding
    try:
        return secaggplus_mod(msg, context, train)
    except _Left as e:  # the error reply as it is (an offline node keeps its state)
        return e.reply
    finally:
        np.random.set_state(outside)


class _Left(Exception):
    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def is_masked_round(cfg: RunConfig, msg: Message) -> bool:
    """Whether ``msg`` is the train stage of a SecAgg+ round; ValueError when that disagrees with ``privacy.secagg``
    (a client of a SecAgg+ run never sends its scalars in the clear)."""
    masked = RECORD_KEY_CONFIGS in msg.content and FITINS in msg.content
    if masked and not cfg.privacy.secagg:
        raise ValueError("a SecAgg+ train message, but this run has privacy.secagg=false")
    if cfg.privacy.secagg and not masked:
        raise ValueError("this run has privacy.secagg=true: the client sends its scalars only inside SecAgg+")
    return masked


def train_records(msg: Message) -> tuple[RecordDict, float]:
    """The round's train message records and this client's aggregation weight, from the FitIns SecAgg+ carries."""
    config = msg.content[FITINS]
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(config[PAYLOAD])), float(config[WEIGHT])
    except Exception as e:  # a malformed payload fails inside protobuf with various types
        raise ValueError(f"the SecAgg+ train message has no valid {PAYLOAD!r}/{WEIGHT!r}: {e}") from None


def encode(cfg: RunConfig, grads: np.ndarray, loss: float) -> tuple[np.ndarray, int]:
    """The vector SecAgg+ masks (module docstring) and how many of its values were clipped to the range."""
    fed, c = cfg.federation, cfg.privacy.secagg_range
    raw = np.append(np.asarray(grads, dtype=np.float64).ravel(), loss * c / LOSS_RANGE)
    if raw.size != fed.local_steps * cfg.zo.q + 1 or not np.isfinite(raw).all():
        raise ValueError(f"{raw.size - 1} projected gradients, or a non-finite value: the client leaves the round")
    clipped = int((np.abs(raw) > c).sum())
    return np.append(np.clip(raw, -c, c), c * clipped / raw.size), clipped


def masked_reply(cfg: RunConfig, grads: np.ndarray, loss: float, weight: float, partition: int, rnd: int) -> RecordDict:
    """The train reply the mod masks: a FitRes whose only array is :func:`encode`'s vector, weighted by ``weight``.

    Flower's stochastic rounding of that vector draws from numpy's global generator once this returns: it is
    seeded here per run, round and client, so a SecAgg+ run repeats bit for bit (:func:`client_mod` restores it)."""
    np.random.seed(rng.derive_seed(cfg.seed, SECAGG_ROUNDING, rnd, partition))
    vec, clipped = encode(cfg, grads, loss)
    if clipped:
        client_log.warning(
            "client %d round %d: clipped %d of %d values to privacy.secagg_range=%g",
            partition,
            rnd,
            clipped,
            vec.size - 1,
            cfg.privacy.secagg_range,
        )
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), weight, {})  # type: ignore[arg-type]
    return fitres_to_recorddict(fitres, keep_input=False)


# --- server ------------------------------------------------------------------------------------------------------
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


def decode(cfg: RunConfig, mean: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """The weighted mean (local_steps, q) scalars, train loss and clipped share from the unmasked vector."""
    steps, q, c = cfg.federation.local_steps, cfg.zo.q, cfg.privacy.secagg_range
    size = steps * q
    if mean.shape != (size + 2,) or not np.isfinite(mean).all():
        raise ValueError(f"the unmasked SecAgg+ vector has shape {mean.shape}; expected ({size + 2},)")
    share = float(mean[size + 1]) / c
    share = share if share > tolerance(cfg, n) / c else 0.0  # below the encoding noise: nothing was clipped
    return mean[:size].reshape(steps, q), float(mean[size]) * LOSS_RANGE / c, share
