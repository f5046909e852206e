"""Flower ServerApp: wait for the nodes, register them, run the rounds of :class:`PRGEStrategy`, evaluate.

``make_server_app(cfg)`` is what ``python -m fedprge.simulate`` runs; the module-level ``app`` is the same
server for ``flwr run`` (configuration from the run config, see pyproject.toml).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedprge.config import RunConfig, load_config, to_yaml
from fedprge.federation.protocol import content_bytes, wire_bytes
from fedprge.federation.strategy import Client, PRGEStrategy
from fedprge.results import RunWriter

log = logging.getLogger("fedprge.server")


class Traffic:
    """Exact bytes of the serialized Flower messages, by phase (setup/train/evaluate) and direction."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.payload: dict[str, int] = defaultdict(int)
        self.count: dict[str, int] = defaultdict(int)

    def add(self, phase: str, direction: str, msgs: list[Message]) -> int:
        """Count messages (error replies carry no content and are not counted); returns their wire bytes."""
        total = 0
        for m in msgs:
            if m.has_error():
                continue
            n = wire_bytes(m)
            total += n
            self.bytes[f"{phase}_{direction}"] += n
            self.payload[f"{phase}_{direction}"] += content_bytes(m.content)
            self.count[f"{phase}_{direction}"] += 1
        return total


def wait_for_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    """Block until ``n`` nodes are connected; fail loudly if they never come (no silent empty rounds)."""
    start = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(
                f"only {len(nodes)} of {n} nodes connected within {timeout_s:.0f} s; "
                "check that every SuperNode is running and can reach the SuperLink"
            )
        time.sleep(0.2)
    return nodes


def register(
    grid: Grid, nodes: list[int], cfg: RunConfig, traffic: Traffic, timeout_s: float
) -> tuple[list[Client], int]:
    """Send every node the run's config; learn its partition id, data size and the adapter size."""
    setup = ConfigRecord({"config": to_yaml(cfg)})
    msgs = [Message(RecordDict({"setup": setup}), dst_node_id=n, message_type="query") for n in nodes]
    traffic.add("setup", "down", msgs)
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    traffic.add("setup", "up", replies)
    clients, seen = [], set()
    for r in replies:
        if r.has_error():
            log.warning("node %s failed to register: %s", r.metadata.src_node_id, r.error.reason)
            continue
        info = r.content["info"]
        part = int(info["partition"])
        if part in seen:
            log.warning("node %s claims partition %d, already taken; ignored", r.metadata.src_node_id, part)
            continue
        seen.add(part)
        clients.append(Client(r.metadata.src_node_id, part, int(info["num_examples"])))
    if not clients:
        raise RuntimeError("no node registered; see the client errors above")
    params = {int(r.content["info"]["num_params"]) for r in replies if not r.has_error()}
    if len(params) != 1:
        raise RuntimeError(f"registered nodes disagree on the adapter size: {sorted(params)}")
    return sorted(clients, key=lambda c: c.partition), params.pop()


def evaluate(
    grid: Grid, strategy: PRGEStrategy, rnd: int, methods: list[str], traffic: Traffic, clients: list[Client]
) -> list[dict[str, float]]:
    msgs = list(strategy.configure_evaluate(rnd, None, None, grid, methods=methods, clients=clients))
    traffic.add("evaluate", "down", msgs)
    replies = list(grid.send_and_receive(msgs, timeout=strategy.cfg.federation.timeout_s))
    traffic.add("evaluate", "up", replies)
    return strategy.evaluation_rows(rnd, replies)


def run_federation(grid: Grid, cfg: RunConfig, writer: RunWriter | None = None) -> dict:
    """The whole run; returns the summary written to ``summary.json``."""
    fed = cfg.federation
    writer = writer or RunWriter(cfg)
    traffic = Traffic()
    t0 = time.monotonic()
    nodes = wait_for_nodes(grid, fed.clients, timeout_s=fed.timeout_s)
    clients, num_params = register(grid, nodes, cfg, traffic, fed.timeout_s)
    strategy = PRGEStrategy(cfg, clients, num_params)
    strategy.summary()
    eval_clients = clients[: cfg.eval.max_clients] if cfg.eval.max_clients else clients
    curve_clients = eval_clients[: cfg.eval.curve_clients] if cfg.eval.curve_clients else eval_clients
    writer.curve_partitions = {c.partition for c in curve_clients}
    before = evaluate(grid, strategy, 0, ["global"], traffic, eval_clients)
    writer.evaluation(0, before)
    columns = [
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not writer.progress) as bar:
        task = bar.add_task("rounds", total=fed.rounds, info="")
        for rnd in range(1, fed.rounds + 1):
            t_round = time.monotonic()
            msgs = list(strategy.configure_train(rnd, None, None, grid))
            down = traffic.add("train", "down", msgs)
            replies = list(grid.send_and_receive(msgs, timeout=fed.timeout_s))
            up = traffic.add("train", "up", replies)  # with federation.verify it includes the B check
            stats = strategy.aggregate(rnd, replies)
            row = {
                "round": rnd,
                "sampled": len(msgs),
                "ok": stats.ok,
                "failed": len(stats.failed),
                "skipped": stats.skipped,
                "train_loss": stats.train_loss,
                "uplink_bytes": up,
                "downlink_bytes": down,
                "uplink_bytes_per_client": up / max(stats.ok, 1),
                "downlink_bytes_per_client": down / max(len(msgs), 1),
                "reconstruction_error": stats.reconstruction_error,
                "seconds": time.monotonic() - t_round,
            }
            if cfg.eval.every and rnd % cfg.eval.every == 0 and rnd != fed.rounds:
                writer.evaluation(rnd, evaluate(grid, strategy, rnd, ["global"], traffic, curve_clients))
            writer.round(row, writer.last_eval(rnd))
            info = f"train loss {stats.train_loss:.4f}  up {row['uplink_bytes_per_client']:.0f} B/client"
            bar.update(task, advance=1, info=info)
    after = evaluate(grid, strategy, fed.rounds, list(cfg.eval.personalization), traffic, eval_clients)
    writer.evaluation(fed.rounds, after)
    return writer.finish(strategy.b, traffic, before, after, time.monotonic() - t0, strategy.num_params)


def make_server_app(cfg: RunConfig, writer: RunWriter | None = None, outcome: dict | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``; ``outcome`` receives the run's ``summary`` or the ``error`` that ended it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federation(grid, cfg, writer)
        except Exception as e:
            if outcome is None:
                raise
            outcome["error"] = e
            log.error("the federation failed: %s", e)
            return
        if outcome is not None:
            outcome["summary"] = summary

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: dotted run-config keys (e.g. ``federation.clients``) override the defaults."""
    overrides = [f"{k}={v}" for k, v in context.run_config.items()]
    run_federation(grid, load_config(overrides=overrides))
