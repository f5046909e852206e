"""Flower ClientApp: registration, local P-RGE training and evaluation, speaking :mod:`fedprge.federation.protocol`.

Per-node state lives in ``context.state`` (it survives rounds in simulation and deployment): the run's
config (from registration), the last synced global B and the round it reflects, the personal B (its last
trained B) and, when a Ditto method is evaluated, its Ditto B (:mod:`fedprge.personalize`); none of them is sent.
With ``privacy.secagg`` the train message of a round reaches :func:`train` through Flower's ``secaggplus_mod``
(:mod:`fedprge.federation.secagg`), and the only thing the client returns is the vector that mod masks.
A SuperNode's node config may pick the client backend (``pte='/path/p.pte'``: an ExecuTorch client that loads no
model; see :func:`fedprge.task.client_overrides`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprge.export.run_folder import save_personal_b
from fedprge.federation import faults, secagg
from fedprge.federation.protocol import GlobalState, RoundUpdate, pack_f32
from fedprge.federation.updates import apply_round, catch_up, pool_b
from fedprge.personalize import TRAINED_IN_ROUNDS, personalize
from fedprge.task import Task, client_overrides, digest, load_task

app = ClientApp(mods=[secagg.client_mod])  # SecAgg+ stage messages go through Flower's secaggplus_mod


def partition_of(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config 'partition-id=N num-partitions=M'"
        ) from None


def task_of(context: Context) -> Task:
    if "setup" not in context.state:
        raise RuntimeError("this node has not been registered (no 'query' message received yet)")
    return load_task(str(context.state["setup"]["config"]), *client_overrides(context.node_config))


def sync_global(task: Task, context: Context, content: RecordDict, keep: bool = True) -> torch.Tensor:
    """Turn the downlinked state (a train or evaluate message's ``content``) into the global B, and (``keep``)
    remember it for the next seed-form update."""
    kind = str(content["round"]["downlink"])
    state = GlobalState.from_record(kind, content["state"])
    if kind == "weights":
        b = state.b
        if b.numel() != task.num_params:
            raise ValueError(f"downlinked B has {b.numel()} entries; the adapters have {task.num_params}")
        synced = int(content["round"]["round"]) - 1
    elif kind == "pool":
        coefs = np.asarray(state.pool_coefs, dtype=np.float32)
        b = task.state_once(("pool", coefs.tobytes()), lambda: pool_b(task.spec, coefs, task.num_params, task.zo))
        synced = int(content["round"]["round"]) - 1
    else:
        held = held_b(context, "global")
        b = held if held is not None else torch.zeros(task.num_params)
        synced = int(context.state["sync"]["round"]) if "sync" in context.state else 0
        b, synced = catch_up(b, synced, state.updates, task.zo, lambda b, upd: replay_round(task, b, upd))
    if keep:
        context.state["global"] = ArrayRecord(array_dict={"b": Array(b.numpy())})
        context.state["sync"] = ConfigRecord({"round": synced})
    return b


def replay_round(task: Task, b: torch.Tensor, upd: RoundUpdate) -> torch.Tensor:
    """``b`` after the seed-form update ``upd``, memoised per process (:meth:`fedprge.task.Task.state_once`)."""
    key = (digest(b), upd.rnd, tuple(upd.seeds), np.asarray(upd.coefs, dtype=np.float32).tobytes())
    return task.state_once(key, lambda: apply_round(b, upd, task.zo))


def held_b(context: Context, name: str) -> torch.Tensor | None:
    """A B this node keeps (``global``: the last synced global B; ``personal``: its last trained B; ``ditto``: its
    Ditto B), if any."""
    held = context.state.get(name)
    return torch.from_numpy(held["b"].numpy()).clone() if held is not None else None


@app.query()
def register(msg: Message, context: Context) -> Message:
    """Store the run's config, load model and data once, and report partition id and data size."""
    context.state["setup"] = ConfigRecord({"config": str(msg.content["setup"]["config"])})
    task = task_of(context)
    part = partition_of(context)
    info = ConfigRecord(
        {
            "partition": part,
            "num_examples": faults.claimed_examples(task.cfg, part, len(task.client(part).train)),
            "num_params": task.num_params,
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task, part = task_of(context), partition_of(context)
    masked = secagg.is_masked_round(task.cfg, msg)  # privacy.secagg: the train stage of Flower's SecAgg+
    content, weight = secagg.train_records(msg) if masked else (msg.content, 0.0)
    rnd = int(content["round"]["round"])
    fault = faults.fault_for(task.cfg, rnd, part)  # injected faults (config section `faults`; none by default)
    if fault.drop:
        return faults.dropped_reply(msg, part, rnd)
    if fault.straggle:
        faults.straggle(task.cfg)
    b = sync_global(task, context, content)
    res = task.train(b, part, rnd)
    context.state["personal"] = ArrayRecord(array_dict={"b": Array(res.b.numpy())})
    if any(m in TRAINED_IN_ROUNDS for m in task.cfg.eval.personalization):  # Ditto's personal B, never sent
        start = held_b(context, "ditto")
        ditto = task.ditto(b if start is None else start, b, part, rnd)
        context.state["ditto"] = ArrayRecord(array_dict={"b": Array(ditto.numpy())})
    grads = faults.corrupt(res.projected_grads, fault.poison, task.cfg.faults.poison_scale)
    if masked:  # only the vector the mod masks leaves: scalars, loss and clip count inside it, nothing else
        return Message(secagg.masked_reply(task.cfg, grads, res.loss, weight, part, rnd), reply_to=msg)
    reply = RecordDict(
        {
            "update": ConfigRecord(
                {
                    "projected_grads": pack_f32(grads),
                    "num_examples": faults.claimed_examples(task.cfg, part, len(task.client(part).train)),
                }
            ),
            "metrics": MetricRecord({"train_loss": res.loss}),
        }
    )
    if task.cfg.federation.verify:
        reply["check"] = ArrayRecord(array_dict={"b": Array(res.b.numpy())})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the requested methods on this client's held-out data."""
    task, part = task_of(context), partition_of(context)
    attempt = int(msg.content["eval"].get("attempt", 0))
    fault = faults.eval_fault_for(task.cfg, part, attempt)  # injected evaluation faults (none by default)
    if fault.drop:
        return faults.eval_dropped_reply(msg, part, attempt)
    time.sleep(fault.delay_s)
    b = sync_global(task, context, msg.content, keep=bool(msg.content["eval"].get("sync", True)))
    methods = list(msg.content["eval"]["methods"])
    metrics: dict[str, float] = {"partition": part, "num_examples": len(task.client(part).test)}
    if msg.content["eval"].get("validate") and task.client(part).val:  # the final evaluation: for studies' tuning
        metrics["global_val_loss"] = task.validation_loss(b, part)
    own = {name: held_b(context, name) for name in ("personal", "ditto")}
    states = personalize(task, methods, b, part, own["personal"], own["ditto"])
    if save := str(msg.content["eval"].get("save", "")):  # export.personal: keep this client's B for the export
        save_personal_b(save, part, states[task.cfg.export.personal].b)
    for method, p in states.items():
        for k, v in task.evaluate(p.b, part, p.label_bias, p.token_prior).items():
            metrics[f"{method}_{k}"] = v
        metrics.update({f"{method}_{k}": v for k, v in p.chosen.items()})
        for steps, b_k in p.trail.items():  # eval.trace: the held-out metrics after each step budget
            metrics.update({f"{method}@{steps}_{k}": v for k, v in task.evaluate(b_k, part).items()})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
