"""The wire protocol: what travels between server and clients, in Flower records, and how big it is.

Message types (Flower ``message_type``) and their content (``RecordDict`` keys):

* ``query`` (registration, once per node): down ``"setup"`` ConfigRecord{config: YAML of the run};
  up ``"info"`` ConfigRecord{partition: int, num_examples: int}.
* ``train``: down ``"round"`` ConfigRecord{round: int} plus the global state in one of three downlink forms,
  ``"state"`` (see :class:`GlobalState`); up ``"update"`` ConfigRecord{projected_grads: bytes,
  num_examples: int} and ``"metrics"`` MetricRecord{train_loss}. ``projected_grads`` are the
  local_steps x q float32 scalars, little-endian, step-major. No seed travels: each is
  :func:`fedprge.engine.seeds.step_seeds` (run seed, round, partition, step). With ``privacy.secagg`` these
  records ride inside Flower's SecAgg+ stage messages and the reply is the masked vector
  (:mod:`fedprge.federation.secagg`).
* ``evaluate``: down ``"round"`` + ``"state"`` + ConfigRecord ``"eval"`` {methods: list[str], sync: bool,
  attempt: int (0, then 1, 2, ... when the server re-sends the same evaluation)};
  up MetricRecord ``"metrics"`` {partition, <method>_loss, <method>_acc, num_examples}.

Every ``train`` / ``evaluate`` message has ``group_id = str(round)``; the server reads only the first reply of
each node to a message it sent in the current round (``reply_to``), and never a seed from a client.

Downlink forms of the global state (``GlobalState.kind``):
  ``weights``: ArrayRecord{"b": float32 (P,)}, the new global B itself.
  ``seeds``: ConfigRecord{rounds, sizes, seeds: uint32 bytes, coefs: float32 bytes}: the aggregated
     seed/coefficient lists of every round since the client's last sync, replayed in order.
  ``pool``: ConfigRecord{coefs: float32 bytes (K,)}: FedKSeed's cumulative coefficient of each pool seed;
     the global B is b0 - (lr / q) * sum_k coefs_k z(pool_k), however many rounds or clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto, recorddict_to_proto

from fedprge.engine import rng


def pack_f32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def _check_bytes(data: object, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"a {what} field must be bytes, got {type(data).__name__}")
    if len(data) % 4:
        raise ValueError(f"a {what} field has {len(data)} bytes, not a multiple of 4")
    return bytes(data)


def unpack_f32(data: bytes) -> np.ndarray:
    """Little-endian float32 bytes to an array; ValueError on anything else."""
    return np.frombuffer(_check_bytes(data, "float32"), dtype="<f4").copy()


def pack_u32(values) -> bytes:
    return np.asarray(values, dtype="<u4").tobytes()


def unpack_u32(data: bytes) -> list[int]:
    """Little-endian uint32 bytes to Python ints; ValueError on anything else."""
    return np.frombuffer(_check_bytes(data, "uint32"), dtype="<u4").astype(np.int64).tolist()


def _field(rec: object, key: str, kind: str) -> object:
    try:
        return rec[key]  # type: ignore[index]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"the {kind} record has no field {key!r}") from None


def _int_list(value: object, key: str, minimum: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"seed state field {key!r} must be a list of integers, got {value!r:.80}")
    if any(v < minimum for v in value):
        raise ValueError(f"seed state field {key!r} must hold integers >= {minimum}, got {value!r:.80}")
    return list(value)


@dataclass
class RoundUpdate:
    """One round's aggregated update in seed form: b <- b - (lr/q) * sum_k coefs_k z(seeds_k)."""

    rnd: int
    seeds: list[int]
    coefs: np.ndarray  # float32


@dataclass
class GlobalState:
    """The global B in one downlink form (see module docstring)."""

    kind: str
    b: torch.Tensor | None = None
    updates: list[RoundUpdate] = field(default_factory=list)
    pool_coefs: np.ndarray | None = None

    def to_record(self) -> ArrayRecord | ConfigRecord:
        if self.kind == "weights":
            assert self.b is not None
            return ArrayRecord(array_dict={"b": Array(self.b.numpy())})
        if self.kind == "seeds":
            return ConfigRecord(
                {
                    "rounds": [u.rnd for u in self.updates],
                    "sizes": [len(u.seeds) for u in self.updates],
                    "seeds": pack_u32([s for u in self.updates for s in u.seeds]),
                    "coefs": pack_f32(np.concatenate([u.coefs for u in self.updates]) if self.updates else []),
                }
            )
        assert self.pool_coefs is not None
        return ConfigRecord({"coefs": pack_f32(self.pool_coefs)})

    @classmethod
    def from_record(cls, kind: str, rec: ArrayRecord | ConfigRecord) -> GlobalState:
        """Decode a downlinked state; raises ValueError (naming the field) on any malformed record."""
        if kind == "weights":
            arr = _field(rec, "b", kind)
            try:
                b = np.asarray(arr.numpy(), dtype=np.float32)  # type: ignore[attr-defined]
            except Exception as e:  # a malformed Array fails inside numpy/Flower with various types
                raise ValueError(f"the weights state's 'b' is not a float array: {e}") from None
            if b.ndim != 1:
                raise ValueError(f"the weights state's 'b' must be a flat vector, got shape {b.shape}")
            return cls(kind, b=torch.from_numpy(b.copy()))
        if kind == "seeds":
            seeds, coefs = unpack_u32(_field(rec, "seeds", kind)), unpack_f32(_field(rec, "coefs", kind))
            sizes = _int_list(_field(rec, "sizes", kind), "sizes", 0)
            rounds = _int_list(_field(rec, "rounds", kind), "rounds", 1)
            if sum(sizes) != len(seeds) or len(seeds) != len(coefs) or len(sizes) != len(rounds):
                raise ValueError(f"inconsistent seed update: sizes {sizes}, {len(seeds)} seeds, {len(coefs)} coefs")
            if any(b <= a for a, b in zip(rounds, rounds[1:], strict=False)):
                raise ValueError(f"seed update rounds must increase strictly, got {rounds}")
            updates, start = [], 0
            for r, n in zip(rounds, sizes, strict=True):
                updates.append(RoundUpdate(r, seeds[start : start + n], coefs[start : start + n]))
                start += n
            return cls(kind, updates=updates)
        if kind == "pool":
            return cls(kind, pool_coefs=unpack_f32(_field(rec, "coefs", kind)))
        raise ValueError(f"unknown downlink kind {kind!r}")


def apply_coefficients(
    b: torch.Tensor, seeds: list[int], coefs, scale: float, distribution: str, chunk: int = 64
) -> torch.Tensor:
    """b - scale * sum_k coefs_k z(seeds_k), accumulated in a fixed order (identical on every party)."""
    coefs = torch.as_tensor(np.asarray(coefs, dtype=np.float32))
    acc = torch.zeros_like(b)
    for start in range(0, len(seeds), chunk):
        z = rng.directions(seeds[start : start + chunk], b.numel(), distribution)
        for i in range(z.shape[0]):
            acc += coefs[start + i] * z[i]
    return b - scale * acc


def decode_grads(update: ConfigRecord, local_steps: int, q: int) -> np.ndarray:
    """The (local_steps, q) float32 projected gradients of a train reply; ValueError on a wrong count or type."""
    g = unpack_f32(_field(update, "projected_grads", "update"))
    if g.size != local_steps * q:
        raise ValueError(f"reply carries {g.size} projected gradients; expected local_steps*q = {local_steps * q}")
    return g.reshape(local_steps, q)


def wire_bytes(msg: Message) -> int:
    """Exact size of the serialized Flower message (content and metadata) as it crosses the wire."""
    return message_to_proto(msg).ByteSize()


def content_bytes(content: RecordDict) -> int:
    """Size of the serialized RecordDict alone (the payload without Flower's message metadata)."""
    return recorddict_to_proto(content).ByteSize()
