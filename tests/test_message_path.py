"""The server's reply rules through Flower's real message path: a ServerApp on a simulated Grid (Ray backend) sends
real train messages to real ClientApps, whose faults are injected where the README says (inside the ClientApp),
and feeds the replies to :meth:`PRGEStrategy.aggregate`.

One simulation of 11 nodes serves every test of this module. Each node is registered twice: once with the run's
config (so the server learns which node holds which partition), then with its own config, which sets its data size
and its fault:

========  ============================================================================================
partition what it does
========  ============================================================================================
0, 1      honest, 4 and 8 training examples (different aggregation weights)
2         straggler: answers round 1 after the deadline ``federation.timeout_s``
3 - 8     poison kinds ``nan``, ``inf``, ``huge``, ``wrong_count``, ``scaled`` (x -100), ``count`` (x 1e6 examples)
9         drops out (error reply)
10        honest but left out of the server's registrations: an unknown node
========  ============================================================================================

Round 1: all ten registered clients. Round 2: clients 0 and 1, plus replies the server never asked for (a second
message to client 1, one to the unknown node, the late round-1 reply, a forged and a duplicated reply). Round 3:
clients 0 and 3 (one valid reply < ``federation.min_clients=2``: skipped).
"""

from __future__ import annotations

import copy
import logging
import os
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedprge.config import load_config, to_yaml
from fedprge.engine import rng
from fedprge.engine.seeds import SeedSpec, step_seeds
from fedprge.federation.protocol import GlobalState, unpack_f32
from fedprge.federation.server_app import accept_registrations, register, wait_for_nodes
from fedprge.federation.strategy import PRGEStrategy
from fedprge.federation.traffic import Traffic

N, UNKNOWN, STRAGGLER, DROPPER = 11, 10, 2, 9
POISON = {3: "nan", 4: "inf", 5: "huge", 6: "wrong_count", 7: "scaled", 8: "count"}
TRAIN_EXAMPLES = {0: 4, 1: 8}  # the others keep the smoke config's 16
# the deadline must leave the 9 punctual clients (a model reload each: their configs differ) time on 2 workers
TIMEOUT_S = 45
RUN = [
    f"federation.clients={N}",
    "federation.fraction=1.0",
    f"federation.timeout_s={TIMEOUT_S}",
    "federation.setup_timeout_s=300",
    "federation.min_clients=2",
    "faults.straggler_delay_s=2",
]


def server_cfg(*overrides: str):
    return load_config(["configs/smoke.yaml"], [*RUN, *overrides])


def node_cfg(p: int):
    over = [f"data.max_train_per_client={TRAIN_EXAMPLES.get(p, 16)}"]
    if p in POISON:
        over += ["faults.poison_fraction=1.0", f"faults.poison_kind={POISON[p]}"]
    if p == STRAGGLER:
        over += ["faults.straggler_rate=1.0"]
    if p == DROPPER:
        over += ["faults.drop_rate=1.0"]
    return server_cfg(*over)


def train_message(rnd: int, node: int, b: torch.Tensor) -> Message:
    """A train message in the documented wire format (protocol.py), dense B downlink."""
    state = GlobalState("weights", b=b.clone())
    content = RecordDict({"round": ConfigRecord({"round": rnd, "downlink": "weights"}), "state": state.to_record()})
    return Message(content, dst_node_id=node, message_type="train", group_id=str(rnd))


def drive(grid: Grid, out: dict) -> None:
    cfg = server_cfg()
    nodes = wait_for_nodes(grid, N, 300)
    first, _ = register(grid, nodes, cfg, Traffic(), 300)
    node_of = {c.partition: c.node_id for c in first}
    queries = [
        Message(RecordDict({"setup": ConfigRecord({"config": to_yaml(node_cfg(p))})}), node_of[p], "query")
        for p in range(N)
    ]
    infos = list(grid.send_and_receive(queries, timeout=300))
    clients, num_params = accept_registrations([r for r in infos if r.metadata.src_node_id != node_of[UNKNOWN]], cfg)
    s = PRGEStrategy(cfg, clients, num_params)

    # round 1: every registered client; the straggler's reply comes after the deadline
    sent1 = list(s.configure_train(1))
    start = time.monotonic()
    replies1 = list(grid.send_and_receive(sent1, timeout=TIMEOUT_S))
    waited = time.monotonic() - start
    stats1 = s.aggregate(1, replies1, sent=sent1)
    b1 = s.b.clone()
    late_id = next(m.metadata.message_id for m in sent1 if m.metadata.dst_node_id == node_of[STRAGGLER])
    late: list[Message] = []
    while not late and time.monotonic() - start < 10 * TIMEOUT_S:
        late = list(grid.pull_messages([late_id]))
        time.sleep(0.2)
    late_after = time.monotonic() - start

    # round 2: clients 0 and 1, and replies that answer nothing the server sent in round 2
    sent2 = [m for m in s.configure_train(2) if m.metadata.dst_node_id in (node_of[0], node_of[1])]
    extra = [train_message(2, node_of[1], s.b), train_message(2, node_of[UNKNOWN], s.b)]
    replies2 = list(grid.send_and_receive(sent2 + extra, timeout=300))
    by_dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent2}
    honest2 = [r for r in replies2 if r.metadata.reply_to_message_id in by_dst]
    forged = copy.deepcopy(next(r for r in honest2 if r.metadata.src_node_id == node_of[0]))
    forged.metadata.__dict__["_src_node_id"] = node_of[1]  # client 1 answering the message sent to client 0
    duplicate = next(r for r in honest2 if r.metadata.src_node_id == node_of[1])
    hostile2 = [r for r in replies2 if r not in honest2] + late + [forged]
    stats2 = s.aggregate(2, [forged, *honest2, *hostile2[:-1], duplicate], sent=sent2)
    b2 = s.b.clone()

    # round 3: one valid reply (client 0) and a NaN one (client 3): fewer than min_clients=2
    sent3 = [m for m in s.configure_train(3) if m.metadata.dst_node_id in (node_of[0], node_of[3])]
    stats3 = s.aggregate(3, list(grid.send_and_receive(sent3, timeout=300)), sent=sent3)
    out.update(
        clients=clients,
        num_params=num_params,
        node_of=node_of,
        sent1=sent1,
        replies1=replies1,
        stats=(stats1, stats2, stats3),
        b=(b1, b2, s.b.clone()),
        waited=waited,
        late=late,
        late_after=late_after,
        sent2=sent2,
        honest2=honest2,
        weight=dict(s.weight),
    )


@pytest.fixture(scope="module")
def wire():
    from flwr.simulation import run_simulation

    from fedprge.federation.client_app import app as client_app
    from fedprge.simulate import backend_config
    from fedprge.task import load_data

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.getLogger("flwr").setLevel(logging.WARNING)
    load_data(server_cfg())  # fill the data cache before the workers start
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            drive(grid, out)
        except Exception as e:  # noqa: BLE001 - reported by the fixture below
            out["error"] = e

    backend = backend_config(server_cfg())
    run_simulation(server_app=server, client_app=client_app, num_supernodes=N, backend_config=backend)
    if "error" in out:
        raise out["error"]
    return out


def grads_of(reply: Message) -> np.ndarray:
    return unpack_f32(reply.content["update"]["projected_grads"])


def replies_by_partition(wire: dict) -> dict[int, Message]:
    part = {n: p for p, n in wire["node_of"].items()}
    return {part[r.metadata.src_node_id]: r for r in wire["replies1"]}


def expected_b(wire: dict, weights: dict[int, float], clip_to_median: bool = False) -> torch.Tensor:
    """Round 1's global B written out from the README, in float64: each accepted client's scalars (a norm above
    3 x the lower median norm scaled down to it; ``clip_to_median``: every norm then at most that median), weighted
    by its registered count over the accepted clients, times its own directions: b = -lr/q sum_c w_c sum g z."""
    cfg, replies = server_cfg(), replies_by_partition(wire)
    g = {p: grads_of(replies[p]).astype(np.float64).reshape(cfg.federation.local_steps, cfg.zo.q) for p in weights}
    norm = {p: float(np.sqrt((x**2).sum())) for p, x in g.items()}
    median = sorted(norm.values())[(len(norm) - 1) // 2]
    limit = median if clip_to_median else 3 * median
    spec = SeedSpec(cfg.seed, cfg.zo.q, "client")
    total = sum(weights.values())
    b = torch.zeros(wire["num_params"], dtype=torch.float64)
    for p, x in g.items():
        x = x * min(1.0, limit / norm[p])
        for t in range(cfg.federation.local_steps):
            z = rng.directions(step_seeds(spec, 1, p, t), wire["num_params"]).double()
            b -= cfg.zo.lr / cfg.zo.q * weights[p] / total * (torch.from_numpy(x[t])[:, None] * z).sum(0)
    return b


def test_a_late_reply_arrives_after_the_deadline_and_never_reaches_B(wire):
    stats1, stats2, _ = wire["stats"]
    assert stats1.late == [STRAGGLER] and wire["waited"] >= TIMEOUT_S
    (late,) = wire["late"]  # it did arrive, a valid round-1 reply, but only after the deadline
    assert not late.has_error() and late.metadata.group_id == "1" and wire["late_after"] > TIMEOUT_S
    assert late.metadata.src_node_id == wire["node_of"][STRAGGLER]
    # B equals a round in which the straggler was absent; had its scalars been read, B would differ
    absent = PRGEStrategy(server_cfg(), wire["clients"], wire["num_params"])
    on_time = [m for m in wire["sent1"] if m.metadata.dst_node_id != wire["node_of"][STRAGGLER]]
    absent.aggregate(1, wire["replies1"], sent=on_time)
    assert torch.equal(absent.b, wire["b"][0])
    read = PRGEStrategy(server_cfg(), wire["clients"], wire["num_params"])
    assert read.aggregate(1, [*wire["replies1"], late], sent=wire["sent1"]).ok == stats1.ok + 1
    assert float((read.b - wire["b"][0]).abs().max()) > 1e-4
    # in the next round the late reply is stale
    assert f"client {STRAGGLER}: it answers round '1', not round 2 (stale or replayed)" in stats2.rejected


@pytest.mark.parametrize(
    ("partition", "rule"),
    [
        (3, "client 3: 6 of 12 projected gradients are not finite (NaN/inf)"),
        (4, "client 4: 1 of 12 projected gradients are not finite (NaN/inf)"),
        (5, "client 5: a projected gradient of magnitude 1e+30 exceeds federation.max_abs_grad=1e+06"),
        (6, "client 6: reply carries 11 projected gradients; expected local_steps*q = 12"),
    ],
)
def test_poisoned_replies_from_the_real_client_app_are_rejected(wire, partition, rule):
    stats1 = wire["stats"][0]
    assert rule in stats1.rejected
    g = grads_of(replies_by_partition(wire)[partition])  # the poison really travelled
    assert {3: np.isnan(g).sum() == 6, 4: np.isinf(g).sum() == 1, 5: abs(g).min() == 1e30, 6: g.size == 11}[partition]


def test_every_fault_kind_is_counted_and_only_honest_scalars_reach_B(wire):
    """Round 1 accepts 0, 1, 7 (scaled: clipped) and 8 (count: capped weight); 9 failed; 2 late; 3-6 rejected.
    Global B is the README's formula over the accepted clients with the registered, capped counts (4, 8, 16, and
    3 x the lower median count 16 = 48). Float32 accumulation is off by ~1e-8; |B| is ~1e-2, and weighting the four
    clients equally instead moves B by more than 1e-3."""
    stats1 = wire["stats"][0]
    assert (stats1.ok, len(stats1.rejected), stats1.late, stats1.clipped) == (4, 4, [STRAGGLER], [7])
    assert [f.split(":")[0] for f in stats1.failed] == [f"client {DROPPER}"]
    assert wire["weight"][8] == 48 and wire["weight"][0] == 4 and wire["weight"][1] == 8
    count_reply = replies_by_partition(wire)[8]
    assert count_reply.content["update"]["num_examples"] == 16_000_000  # the claim in the reply was ignored
    weights = {0: 4, 1: 8, 7: 16, 8: 48}
    want = expected_b(wire, weights)
    assert float((wire["b"][0].double() - want).abs().max()) < 1e-6
    equal = expected_b(wire, dict.fromkeys(weights, 1))
    assert float((equal - want).abs().max()) > 1e-3


def test_replies_to_unsent_messages_unknown_forged_and_duplicate_are_rejected(wire):
    _, stats2, _ = wire["stats"]
    assert stats2.ok == 2 and stats2.late == []
    reasons = "\n".join(stats2.rejected)
    assert "not sent in round 2 (replayed)" in reasons  # the second message to client 1 was not in `sent`
    assert f"unknown node {wire['node_of'][UNKNOWN]}: it is not registered" in reasons
    assert f"client 1: it answers a message addressed to node {wire['node_of'][0]} (forged)" in reasons
    assert "client 1: a second reply in the same round (the first one counts)" in reasons
    assert len(stats2.rejected) == 5  # and the stale late reply
    # B equals the round with only the two replies it asked for
    alone = PRGEStrategy(server_cfg(), wire["clients"], wire["num_params"])
    alone.b = wire["b"][0].clone()
    alone.aggregate(2, wire["honest2"], sent=wire["sent2"])
    assert torch.equal(alone.b, wire["b"][1]) and not torch.equal(wire["b"][1], wire["b"][0])


def test_a_round_below_min_clients_is_skipped_in_a_real_run(wire):
    _, _, stats3 = wire["stats"]
    assert (stats3.ok, stats3.skipped, len(stats3.rejected)) == (1, True, 1)
    assert torch.equal(wire["b"][2], wire["b"][1])


def test_median_with_own_seeds_clips_every_client_to_the_median_norm(wire):
    """seed_scope=client: ``median`` scales every accepted client to at most the lower median norm, then takes the
    count-weighted mean (on the real round-1 replies; the same tolerances as above)."""
    s = PRGEStrategy(server_cfg("federation.aggregation=median"), wire["clients"], wire["num_params"])
    s.aggregate(1, wire["replies1"], sent=wire["sent1"])
    want = expected_b(wire, {0: 4, 1: 8, 7: 16, 8: 48}, clip_to_median=True)
    assert float((s.b.double() - want).abs().max()) < 1e-6
    assert float((s.b - wire["b"][0]).abs().max()) > 1e-4  # not the plain mean
