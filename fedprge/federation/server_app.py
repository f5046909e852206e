"""Flower ServerApp: wait for the nodes, register them, run the rounds of :class:`PRGEStrategy`, evaluate.

Before every round the nodes that connected since (a restarted or a late SuperNode) are registered (:func:`rejoin`).

``make_server_app(cfg)`` is what ``python -m fedprge.simulate`` runs; the module-level ``app`` is the same
server for ``flwr run`` (configuration from the run config, see pyproject.toml).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedprge.config import RunConfig, from_yaml, load_config, to_yaml
from fedprge.federation import checkpoint, downlink, secagg_round
from fedprge.federation.evaluation import Evaluated, evaluate
from fedprge.federation.registry import Client, accept_newcomers, accept_registrations
from fedprge.federation.strategy import PRGEStrategy
from fedprge.federation.traffic import Traffic
from fedprge.results import RunWriter, round_row

log = logging.getLogger("fedprge.server")


class RunStopped(RuntimeError):
    """The run stopped early on purpose (``federation.stop_after``); its checkpoint can be resumed."""


def wait_for_nodes(grid: Grid, n: int, timeout_s: float, min_nodes: int = 0) -> list[int]:
    """Block until ``n`` nodes are connected; fail loudly if they never come (no silent empty rounds).

    With ``0 < min_nodes < n`` the run settles, after ``timeout_s``, for the ``>= min_nodes`` nodes present,
    with a warning naming how many are missing."""
    start = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if time.monotonic() - start > timeout_s:
            if min_nodes and len(nodes) >= min_nodes:
                log.warning(
                    "only %d of %d nodes connected within %.0f s: %d missing; starting with %d "
                    "(federation.min_nodes=%d); check the missing SuperNodes' logs and network",
                    len(nodes),
                    n,
                    timeout_s,
                    n - len(nodes),
                    len(nodes),
                    min_nodes,
                )
                return nodes
            need = f" (federation.min_nodes={min_nodes})" if min_nodes else ""
            raise RuntimeError(
                f"only {len(nodes)} of {n} nodes connected within {timeout_s:.0f} s{need}; "
                "check that every SuperNode is running and can reach the SuperLink"
            )
        time.sleep(0.2)
    return nodes


def setup(grid: Grid, nodes: list[int], cfg: RunConfig, traffic: Traffic, timeout_s: float) -> list[Message]:
    """Send ``nodes`` the run's config; their replies carry partition id, data size and adapter size."""
    record = ConfigRecord({"config": to_yaml(cfg)})
    msgs = [Message(RecordDict({"setup": record}), dst_node_id=n, message_type="query") for n in nodes]
    traffic.add("setup", "down", msgs)
    replies = list(grid.send_and_receive(msgs, timeout=timeout_s))
    traffic.add("setup", "up", replies)
    return replies


def register(
    grid: Grid, nodes: list[int], cfg: RunConfig, traffic: Traffic, timeout_s: float
) -> tuple[list[Client], int]:
    """Register the nodes present at the start (rules in :mod:`fedprge.federation.registry`)."""
    return accept_registrations(setup(grid, nodes, cfg, traffic, timeout_s), cfg)


def rejoin(grid: Grid, strategy: PRGEStrategy, traffic: Traffic, refused: set[int], crashed: set[int]) -> None:
    """Register the nodes connected now that the run does not know yet (a restarted SuperNode comes back under a new
    node id) and, once they are connected, the ``crashed`` ones (a restart under the same id, e.g. with SuperNode
    auth, loses the run's config). Updates ``refused`` (nodes not to ask again) and ``crashed`` (those still away)."""
    online = set(grid.get_node_ids())
    new = online - set(strategy.by_node) - refused
    again = crashed & online & set(strategy.by_node)
    if not new and not again:
        return
    cfg = strategy.cfg
    replies = setup(grid, sorted(new | again), cfg, traffic, cfg.federation.setup_timeout_s)
    holders = {c.partition: c.node_id for c in strategy.clients}
    clients, retry = accept_newcomers(replies, cfg, strategy.num_params, holders, online)
    for c in clients:
        strategy.admit(c)
    refused |= new - retry - {c.node_id for c in clients}
    crashed &= set(strategy.by_node) - again


def evaluated_clients(strategy: PRGEStrategy, curve: bool = False) -> list[Client]:
    """The clients an evaluation covers (``eval.max_clients``; ``curve``: the per-round ``eval.curve_clients``)."""
    ev = strategy.cfg.eval
    every = strategy.clients[: ev.max_clients] if ev.max_clients else strategy.clients
    return every[: ev.curve_clients] if curve and ev.curve_clients else every


def run_federation(grid: Grid, cfg: RunConfig, writer: RunWriter | None = None, resume: bool = False) -> dict:
    """The whole run; returns the summary written to ``summary.json``.

    After every round the server state goes to ``checkpoint.pt`` in the run folder; ``resume=True`` continues
    from it (same config, see :mod:`fedprge.federation.checkpoint`) and ends with the same global B."""
    fed = cfg.federation
    writer = writer or RunWriter(cfg)
    traffic = Traffic()
    t0 = time.monotonic()
    nodes = wait_for_nodes(grid, fed.clients, fed.node_wait_s or fed.timeout_s, fed.min_nodes)
    clients, num_params = register(grid, nodes, cfg, traffic, fed.setup_timeout_s)
    strategy = PRGEStrategy(cfg, clients, num_params)
    strategy.summary()
    refused = set(nodes) - set(strategy.by_node)  # refused at registration: not asked again
    crashed: set[int] = set()  # nodes to register again once connected
    writer.curve_partitions = {c.partition for c in evaluated_clients(strategy, curve=True)}
    path, first, seconds = writer.dir / checkpoint.NAME, 1, 0.0
    if resume:
        ck = checkpoint.load(path)
        checkpoint.check_compatible(ck["config"], cfg)
        strategy.load_state_dict(ck["strategy"])
        writer.rounds, writer.evals = list(ck["rounds"]), {int(r): rows for r, rows in ck["evals"].items()}
        writer.missing = {int(r): list(m) for r, m in ck.get("eval_missing", {}).items()}
        traffic.restore(ck["traffic"])
        first, seconds = int(ck["round"]) + 1, float(ck["seconds"])
        before = Evaluated(writer.evals[0], writer.missing.get(0, []))
        log.info("resumed %s after round %d; every node starts unsynced", writer.dir, first - 1)
    else:
        before = evaluate(grid, strategy, 0, ["global"], traffic, evaluated_clients(strategy))
        writer.evaluation(0, before.rows, before.missing)
    columns = [
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=not writer.progress) as bar:
        task = bar.add_task("rounds", total=fed.rounds, completed=first - 1, info="")
        for rnd in range(first, fed.rounds + 1):
            t_round = time.monotonic()
            rejoin(grid, strategy, traffic, refused, crashed)
            msgs = list(strategy.configure_train(rnd))
            kinds = Counter(str(m.content["round"]["downlink"]) for m in msgs)
            replays = sum(downlink.replay_directions(m) for m in msgs)
            if cfg.privacy.secagg:  # Flower's SecAgg+: the server only ever holds the round's masked vectors
                stats, up, down = secagg_round.train_round(grid, strategy, rnd, msgs, traffic)
            else:
                down = traffic.add("train", "down", msgs)
                replies = list(grid.send_and_receive(msgs, timeout=fed.timeout_s))
                up = traffic.add("train", "up", replies)  # with federation.verify it includes the B check
                stats = strategy.aggregate(rnd, replies, sent=msgs)
            crashed |= {strategy.by_partition[p].node_id for p in stats.crashed}
            row = round_row(
                rnd,
                len(msgs),
                stats.ok,
                up,
                down,
                time.monotonic() - t_round,
                failed=len(stats.failed),
                late=len(stats.late),
                rejected=len(stats.rejected),
                clipped=len(stats.clipped),
                skipped=stats.skipped,
                down_seeds=kinds["seeds"],
                down_weights=kinds["weights"],
                replay_directions=replays,
                train_loss=stats.train_loss,
                reconstruction_error=float(stats.reconstruction_error),
                range_clipped=stats.range_clipped,
            )
            if cfg.eval.every and rnd % cfg.eval.every == 0 and rnd != fed.rounds:
                curve = evaluated_clients(strategy, curve=True)
                writer.evaluation(rnd, *evaluate(grid, strategy, rnd, ["global"], traffic, curve))
            writer.round(row, writer.last_eval(rnd))
            if fed.checkpoint:
                state = {
                    "config": to_yaml(cfg),
                    "round": rnd,
                    "strategy": strategy.state_dict(),
                    "rounds": writer.rounds,
                    "evals": writer.evals,
                    "eval_missing": writer.missing,
                    "traffic": traffic.state(),
                    "seconds": seconds + time.monotonic() - t0,
                }
                checkpoint.save(path, state)
            info = f"train loss {stats.train_loss:.4f}  up {row['uplink_bytes_per_client']:.0f} B/client"
            bar.update(task, advance=1, info=info)
            if rnd == fed.stop_after:
                raise RunStopped(
                    f"stopped after round {rnd} (federation.stop_after={rnd}); "
                    f"continue with --resume {writer.dir} (python -m fedprge.simulate or clients/fleet.py)"
                )
    save = str(writer.dir) if cfg.export.personal else ""  # clients keep their personalized B for the export
    rejoin(grid, strategy, traffic, refused, crashed)
    methods = list(cfg.eval.personalization)
    after = evaluate(grid, strategy, fed.rounds, methods, traffic, evaluated_clients(strategy), save, validate=True)
    writer.evaluation(fed.rounds, after.rows, after.missing)
    seconds += time.monotonic() - t0
    return writer.finish(
        strategy.b, traffic, before.rows, after.rows, seconds, strategy.num_params, after.missing, before.missing
    )


def make_server_app(
    cfg: RunConfig, writer: RunWriter | None = None, outcome: dict | None = None, resume: bool = False
) -> ServerApp:
    """A ServerApp bound to ``cfg``; ``outcome`` receives the run's ``summary`` or the ``error`` that ended it."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federation(grid, cfg, writer, resume=resume)
        except Exception as e:
            if outcome is None:
                raise
            outcome["error"] = e
            (log.warning if isinstance(e, RunStopped) else log.error)("the federation failed: %s", e)
            return
        if outcome is not None:
            outcome["summary"] = summary

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: dotted run-config keys (e.g. ``federation.clients``) override the defaults; a non-empty
    ``config`` key is a whole fedprge YAML config that replaces them (``clients/fleet.py`` sends its resolved one);
    a non-empty ``resume`` key is a run folder to continue from its checkpoint (``clients/fleet.py --resume``)."""
    keys = {k: v for k, v in context.run_config.items() if k not in ("config", "resume")}
    text = str(context.run_config.get("config") or "")
    cfg = from_yaml(text) if text else load_config(overrides=[f"{k}={v}" for k, v in keys.items()])
    resume = str(context.run_config.get("resume") or "")
    run_federation(grid, cfg, RunWriter(cfg, out=resume) if resume else None, resume=bool(resume))
