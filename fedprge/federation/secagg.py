"""SecAgg+ on a round's scalars (``privacy.secagg``): Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod``.

With ``seed_scope=round`` every client of a round uses the same directions, so the update needs only the weighted
mean of the clients' scalars; SecAgg+ gives the server that mean and never one client's values. fedprge writes no
protocol: the workflow runs the four stages (setup, share keys, collect masked vectors, unmask) through the grid,
the mod answers them on the client; this module holds the client's end and the encoding, ``secagg_round.py`` the
server's.

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
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedprge.config import RunConfig
from fedprge.engine import rng
from fedprge.engine.seeds import SECAGG_ROUNDING

if TYPE_CHECKING:
    pass

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


def decode(cfg: RunConfig, mean: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """The weighted mean (local_steps, q) scalars, train loss and clipped share from the unmasked vector."""
    steps, q, c = cfg.federation.local_steps, cfg.zo.q, cfg.privacy.secagg_range
    size = steps * q
    if mean.shape != (size + 2,) or not np.isfinite(mean).all():
        raise ValueError(f"the unmasked SecAgg+ vector has shape {mean.shape}; expected ({size + 2},)")
    share = float(mean[size + 1]) / c
    share = share if share > tolerance(cfg, n) / c else 0.0  # below the encoding noise: nothing was clipped
    return mean[:size].reshape(steps, q), float(mean[size]) * LOSS_RANGE / c, share
