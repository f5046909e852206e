"""Bytes per round and per run of every federated fine-tuning method, from a model's shapes alone.

Sizes are those of real serialized Flower messages: each message is built with the same records the
ClientApp/ServerApp send and measured with ``message_to_proto(...).ByteSize()``. Dense arrays larger than a
stand-in are added arithmetically (4 bytes per float32 entry), so a 7B model needs no memory. The model is
built on the ``meta`` device from its config.json: no weights are read.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedprge.config import RunConfig, load_config
from fedprge.federation.protocol import GlobalState, RoundUpdate, pack_f32, wire_bytes
from fedprge.federation.sampling import sample_round
from fedprge.methods import METHODS

_NODE = 2**62 + 12345  # a typical 64-bit node id (its varint size is what counts)


@dataclass(frozen=True)
class Shapes:
    """What a method sends is determined by these counts."""

    lora_b: int  # P: entries of the LoRA-FA B matrices
    lora_a: list[tuple[int, int]]  # shapes of the A matrices
    full: list[tuple[int, ...]]  # shapes of every model weight


def model_shapes(model: str, cfg: RunConfig) -> Shapes:
    """Shapes for ``model``: "tiny", "smollm2", a HF folder or a config.json file (meta device, no weights)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    if model == "tiny":
        from fedprge.models import load_model

        net = load_model("tiny")[0]
    else:
        if model == "smollm2":
            from fedprge.models import smollm2_dir

            path = smollm2_dir()
        else:
            path = Path(model)
            if not path.exists():
                raise ValueError(f"model {model!r}: no such file or folder; give tiny, smollm2, or a config.json")
            path = path.parent if path.is_file() else path
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
    peft_cfg = LoraConfig(r=cfg.lora.rank, target_modules=list(cfg.lora.target_modules))
    targets = [
        m for n, m in net.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(peft_cfg, n)
    ]
    if not targets:
        raise ValueError(f"lora.target_modules={cfg.lora.target_modules} match no linear layer of {model!r}")
    r = cfg.lora.rank
    return Shapes(
        lora_b=sum(m.out_features * r for m in targets),
        lora_a=[(r, m.in_features) for m in targets],
        full=[tuple(p.shape) for p in net.parameters()],
    )


@contextlib.contextmanager
def _identity():
    """Flower stamps run and task ids (64-bit) into every message; use ids of the same size as a real run."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = _NODE + 1, _NODE + 2, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _down(content: RecordDict, kind: str = "train", rnd: int = 1) -> Message:
    """A server-to-client message as the server counts it (before the SuperLink assigns its id)."""
    with _identity():
        return Message(content, dst_node_id=_NODE, message_type=kind, group_id=str(rnd))


def _reply(content: RecordDict, kind: str = "train") -> Message:
    """A client reply as the server counts it: it carries the (SHA-256 hex) id of the message it answers."""
    down = _down(RecordDict({}), kind)
    down.metadata.__dict__["_message_id"] = "0" * 64
    reply = Message(content, reply_to=down)
    return reply


def dense_bytes(named: dict[str, tuple[int, ...]], build) -> int:
    """Bytes of ``build(arrays)`` with float32 arrays of these shapes, stand-ins of 1 entry plus 4 B per entry."""
    stand_in = {n: Array(np.zeros((1,) * max(1, len(s)), dtype=np.float32)) for n, s in named.items()}
    extra = sum(4 * (math.prod(s) - 1) for s in named.values())
    return wire_bytes(build(ArrayRecord(array_dict=stand_in))) + extra


def prge_uplink(cfg: RunConfig) -> int:
    """A train reply: local_steps x q float32 scalars, the example count and the train loss."""
    f = cfg.federation
    update = ConfigRecord({"projected_grads": pack_f32(np.zeros(f.local_steps * cfg.zo.q)), "num_examples": 64})
    return wire_bytes(_reply(RecordDict({"update": update, "metrics": MetricRecord({"train_loss": 0.0})})))


def prge_downlink(cfg: RunConfig, shapes: Shapes, missed_rounds: float = 1.0) -> float:
    """One train message: the global state in the configured downlink form (seeds: ``missed_rounds`` rounds)."""
    f = cfg.federation

    def msg(state: GlobalState | ArrayRecord, kind: str) -> Message:
        rec = state if isinstance(state, ArrayRecord) else state.to_record()
        return _down(RecordDict({"round": ConfigRecord({"round": 2, "downlink": kind}), "state": rec}))

    if f.downlink == "weights":
        return dense_bytes({"b": (shapes.lora_b,)}, lambda arrays: msg(arrays, "weights"))
    if f.downlink == "pool":
        return wire_bytes(msg(GlobalState("pool", pool_coefs=np.zeros(f.pool_size, np.float32)), "pool"))
    per_round = seeds_per_round(cfg)
    sizes = {}
    for n in {math.floor(missed_rounds), math.ceil(missed_rounds)}:
        ups = [RoundUpdate(r + 1, [2**31] * per_round, np.zeros(per_round, np.float32)) for r in range(n)]
        sizes[n] = wire_bytes(msg(GlobalState("seeds", updates=ups), "seeds"))
    lo, hi = math.floor(missed_rounds), math.ceil(missed_rounds)
    return sizes[lo] + (missed_rounds - lo) * (sizes[hi] - sizes[lo])


def seeds_per_round(cfg: RunConfig) -> int:
    f = cfg.federation
    per_client = f.local_steps * cfg.zo.q
    k = len(sample_round(cfg, f.clients, 1))
    return per_client if f.seed_scope == "round" else per_client * k


def mean_missed_rounds(cfg: RunConfig) -> float:
    """Average number of global updates a sampled client must catch up on (seed downlink), replaying the schedule.

    A client that trains in round r is synced up to round r - 1 (round r's aggregate is new to it). Syncs by
    evaluation messages are not counted: this is training's own traffic (what ``eval.sync=false`` measures)."""
    f, synced, missed = cfg.federation, {}, []
    for rnd in range(1, f.rounds + 1):
        for c in sample_round(cfg, f.clients, rnd):
            missed.append(rnd - 1 - synced.get(c, 0))
            synced[c] = rnd - 1
    return float(np.mean(missed))


def fedavg_bytes(cfg: RunConfig, shapes: Shapes, algorithm: str) -> tuple[int, int]:
    """(uplink, downlink) bytes per client-round of FedAvg on the given trainable set."""
    named: dict[str, tuple[int, ...]] = {}
    if algorithm == "fedavg_full":
        named = {f"w{i}": s for i, s in enumerate(shapes.full)}
    else:
        named["b"] = (shapes.lora_b,)
        if algorithm == "fedavg_lora":
            named.update({f"A.{i}": s for i, s in enumerate(shapes.lora_a)})
    up = dense_bytes(
        named,
        lambda a: _reply(RecordDict({"arrays": a, "metrics": MetricRecord({"train_loss": 0.0, "num-examples": 64})})),
    )
    down = dense_bytes(named, lambda a: _down(RecordDict({"arrays": a, "config": ConfigRecord({"server-round": 1})})))
    return up, down


def predict(model: str, cfg: RunConfig) -> list[dict]:
    """One row per method: bytes per client-round and per run for ``cfg``'s fleet."""
    shapes = model_shapes(model, cfg)
    f = cfg.federation
    per_round = len(sample_round(cfg, f.clients, 1))
    rows = []
    for name, overrides in METHODS.items():
        c = load_config([], [*_to_overrides(cfg), *overrides])
        if c.federation.algorithm == "prge":
            up = prge_uplink(c)
            down = prge_downlink(c, shapes, mean_missed_rounds(c) if c.federation.downlink == "seeds" else 1)
        else:
            up, down = fedavg_bytes(c, shapes, c.federation.algorithm)
        rows.append(
            {
                "method": name,
                "uplink_per_client_round": up,
                "downlink_per_client_round": down,
                "per_round": per_round * (up + down),
                "per_run": per_round * (up + down) * f.rounds,
            }
        )
    return rows


def _to_overrides(cfg: RunConfig) -> list[str]:
    f, z, lo = cfg.federation, cfg.zo, cfg.lora
    return [
        f"federation.clients={f.clients}",
        f"federation.rounds={f.rounds}",
        f"federation.fraction={f.fraction}",
        f"federation.local_steps={f.local_steps}",
        f"federation.seed_scope={f.seed_scope}",
        f"federation.pool_size={f.pool_size}",
        f"zo.q={z.q}",
        f"lora.rank={lo.rank}",
        f"lora.target_modules=[{','.join(lo.target_modules)}]",
        f"seed={cfg.seed}",
    ]


def main(model: str, clients: int | None, rounds: int | None, overrides: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    over = list(overrides) + ([f"federation.clients={clients}"] if clients else [])
    over += [f"federation.rounds={rounds}"] if rounds else []
    cfg = load_config([], over)
    shapes = model_shapes(model, cfg)
    rows = predict(model, cfg)
    f = cfg.federation
    t = Table(
        title=f"{model}: P={shapes.lora_b:,} LoRA-FA B entries, {sum(math.prod(s) for s in shapes.full):,} weights; "
        f"{f.clients:,} clients, fraction {f.fraction:g}, {f.rounds} rounds, {f.local_steps} local steps, q={cfg.zo.q}"
    )
    for col in ("method", "uplink / client-round", "downlink / client-round", "per round", "per run"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        t.add_row(r["method"], *(_human(r[k]) for k in list(r)[1:]))
    Console().print(t)
    return 0


def _human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"
