"""First-order FedAvg baselines on the same clients, data and model, run by Flower's own ``FedAvg`` strategy.

``federation.algorithm`` picks what the clients train by backprop and send back dense every round:

* ``fedavg_lora_fa``: the LoRA-FA B matrices (A frozen), i.e. the P entries P-RGE trains;
* ``fedavg_lora``: B and the A matrices (plain LoRA);
* ``fedavg_full``: every weight of the model (no adapters; small models only).

The server evaluates the global state itself on every client's held-out data (this is a simulation; the
server may hold the data), so the per-round metric is comparable with the P-RGE runs. Its ``rounds.csv`` rows have
the P-RGE rows' columns (:func:`fedprge.results.round_row`), their bytes counted by the same :class:`Traffic`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedprge.config import RunConfig, to_yaml
from fedprge.federation.sampling import sample_round
from fedprge.federation.server_app import wait_for_nodes
from fedprge.federation.traffic import CountingGrid, Traffic
from fedprge.results import RunWriter, round_row
from fedprge.task import Task, load_task

log = logging.getLogger("fedprge.fedavg")


def live_tensors(task: Task, algorithm: str) -> dict[str, torch.Tensor]:
    """The model's own tensors a FedAvg client trains (besides B), by name."""
    if algorithm == "fedavg_full":
        return dict(task.backend.model.named_parameters())
    if algorithm == "fedavg_lora":
        return {f"A.{i}": layer.A for i, layer in enumerate(task.backend.lora.layers)}
    return {}


def initial_state(task: Task, algorithm: str) -> dict[str, torch.Tensor]:
    state = {n: t.detach().clone() for n, t in live_tensors(task, algorithm).items()}
    if algorithm != "fedavg_full":
        state["b"] = torch.zeros(task.num_params)
    return state


def load_state(task: Task, algorithm: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Copy ``state`` into the model; returns B (zeros for full-parameter training)."""
    with torch.no_grad():
        for name, t in live_tensors(task, algorithm).items():
            t.copy_(state[name])
    return state["b"].clone() if "b" in state else torch.zeros(task.num_params)


def local_train(task: Task, algorithm: str, state: dict[str, torch.Tensor], partition: int, rnd: int):
    """``local_steps`` Adam steps (fresh state each round) on the client's minibatches; returns (state, loss)."""
    fed = task.cfg.federation
    b = load_state(task, algorithm, state).requires_grad_(algorithm != "fedavg_full")
    tensors = live_tensors(task, algorithm)
    params = [t.requires_grad_(True) for t in tensors.values()] + ([b] if b.requires_grad else [])
    opt = torch.optim.Adam(params, lr=fed.fo_lr)
    losses = []
    try:
        for step in range(fed.local_steps):
            batch = task.train_batch(partition, rnd, step)  # the P-RGE clients' minibatches
            loss = task.backend.losses(b.unsqueeze(0), batch)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    finally:
        for t in tensors.values():
            t.requires_grad_(False)
    out = {n: t.detach().clone() for n, t in tensors.items()}
    if algorithm != "fedavg_full":
        out["b"] = b.detach().clone()
    return out, float(np.mean(losses))


def _to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(array_dict={n: Array(t.detach().numpy()) for n, t in state.items()})


def _from_record(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(a.numpy().copy()) for n, a in rec.items()}


def make_client_app(cfg: RunConfig) -> ClientApp:
    """A ClientApp bound to ``cfg`` (simulation only: the config travels in the closure, not on the wire)."""
    app, yaml = ClientApp(), to_yaml(cfg)

    @app.query()
    def register(msg: Message, context: Context) -> Message:
        part = int(context.node_config["partition-id"])
        return Message(RecordDict({"info": ConfigRecord({"partition": part})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task, part = load_task(yaml), int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        state, loss = local_train(task, cfg.federation.algorithm, _from_record(msg.content["arrays"]), part, rnd)
        n = len(task.client(part).train)
        metrics = MetricRecord({"train_loss": loss, "num-examples": n})
        return Message(RecordDict({"arrays": _to_record(state), "metrics": metrics}), reply_to=msg)

    return app


class DeterministicFedAvg(FedAvg):
    """Flower's FedAvg, sampling the same clients per round as :class:`PRGEStrategy` (by partition id)."""

    def __init__(self, cfg: RunConfig, node_of: dict[int, int]) -> None:
        super().__init__(fraction_train=cfg.federation.fraction, fraction_evaluate=0.0, min_train_nodes=1)
        self.cfg, self.node_of = cfg, node_of

    def configure_train(self, server_round, arrays, config, grid):
        parts = sorted(self.node_of)
        nodes = [self.node_of[parts[i]] for i in sample_round(self.cfg, len(parts), server_round)]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, "train")


def make_server_app(cfg: RunConfig, writer: RunWriter, outcome: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run(grid, cfg, writer)
        except Exception as e:  # reported by the caller, like the P-RGE server
            outcome["error"] = e
            log.error("the FedAvg federation failed: %s", e)

    return app


def run(grid: Grid, cfg: RunConfig, writer: RunWriter) -> dict:
    fed, traffic, t0 = cfg.federation, Traffic(), time.monotonic()
    nodes = wait_for_nodes(grid, fed.clients, timeout_s=fed.timeout_s)
    query = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in nodes]
    node_of = {int(r.content["info"]["partition"]): r.metadata.src_node_id for r in grid.send_and_receive(query)}
    task = load_task(to_yaml(cfg))  # the server's copy, for evaluation only
    eval_parts = sorted(node_of)[: cfg.eval.max_clients] if cfg.eval.max_clients else sorted(node_of)
    metric_rows: dict[int, list[dict]] = {}

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        b = load_state(task, fed.algorithm, _from_record(arrays))
        rows = [{"partition": p, **{f"global_{k}": v for k, v in task.evaluate(b, p).items()}} for p in eval_parts]
        metric_rows[rnd] = rows
        writer.evaluation(rnd, rows)
        return MetricRecord({k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "partition"})

    strategy = DeterministicFedAvg(cfg, node_of)
    counting = CountingGrid(grid, traffic)
    state0 = initial_state(task, fed.algorithm)
    clock = {"round": t0}  # when the round began: the end of the previous round's evaluation

    def on_round(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        seconds = time.monotonic() - clock["round"]  # the round's training, as P-RGE's (evaluation apart)
        res = evaluate(rnd, arrays)
        if rnd:
            sent = counting.last
            ok = [r for r in sent.replies if not r.has_error()]
            losses = [float(r.content["metrics"]["train_loss"]) for r in ok]
            row = round_row(
                rnd,
                len(sent.messages),
                len(ok),
                sent.up,
                sent.down,
                seconds,
                failed=len(sent.replies) - len(ok),
                late=len(sent.messages) - len(sent.replies),
                skipped=not ok,  # Flower's FedAvg keeps the global state when no client replied
                down_weights=len(sent.messages),  # every sampled client gets the dense state
                train_loss=float(np.mean(losses)) if losses else float("nan"),
            )
            writer.round(row, writer.last_eval(rnd))
        clock["round"] = time.monotonic()
        return res

    result = strategy.start(
        grid=counting, initial_arrays=_to_record(state0), num_rounds=fed.rounds, evaluate_fn=on_round
    )
    final = _from_record(result.arrays)
    b = final.get("b", torch.zeros(task.num_params))
    num_params = sum(t.numel() for t in final.values())
    return writer.finish(b, traffic, metric_rows[0], metric_rows[fed.rounds], time.monotonic() - t0, num_params)
