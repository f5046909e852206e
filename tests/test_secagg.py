"""SecAgg+ (``privacy.secagg``): Flower's workflow and mod on real simulations of the smoke federation.

Every run here is a real Flower simulation whose ServerApp drives :func:`run_federation` through a recorder of the
grid: the recorder keeps every message the server code sends and every reply it receives, nothing is mocked. The
plain run and the SecAgg+ run share the seed, ``seed_scope=round`` and ``aggregation=mean``, so their first round
starts from the same B with the same directions: the clients compute the same projected gradients in both.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from fedprge.config import RunConfig, load_config
from fedprge.engine import rng
from fedprge.federation import checkpoint, secagg
from fedprge.federation.protocol import decode_grads, wire_bytes
from fedprge.results import RunWriter

SMOKE = "configs/smoke.yaml"
FAST = [  # one round on all four clients: the global B after it is bounded by the encoding tolerance exactly
    "federation.rounds=1",
    "federation.fraction=1.0",
    "federation.seed_scope=round",
    "federation.norm_bound=0",
    "eval.every=0",
    "eval.personalization=[global]",
]
ON = ["privacy.secagg=true", "federation.max_abs_grad=0"]
FITRES = {"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"}


class Recorder:
    """The grid the server code gets: forwards everything, keeps what was sent and every reply received."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.sent, self.replies = grid, [], []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.sent += messages
        self.replies += replies
        return replies

    def pull_messages(self, ids):
        replies = list(self.grid.pull_messages(ids))
        self.replies += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


@dataclass
class Run:
    cfg: RunConfig
    dir: Path
    rows: list[dict]
    ck: dict
    partition: dict[int, int] = field(default_factory=dict)  # node id -> partition
    replies: list[Message] = field(default_factory=list)
    train_up: int = 0  # wire bytes of every train-phase reply the recorder saw


def federate(out, name: str, *overrides: str) -> Run:
    """One real simulation of the smoke federation; the recorder sees every reply the server code receives."""
    from flwr.simulation import run_simulation

    from fedprge.federation.client_app import app as client_app
    from fedprge.federation.server_app import run_federation
    from fedprge.simulate import backend_config, check_inputs

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = load_config([SMOKE], [f"name={name}", *overrides])
    check_inputs(cfg)
    writer = RunWriter(cfg, out=out / name, progress=False)
    box: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        box["grid"] = Recorder(grid)
        try:
            run_federation(box["grid"], cfg, writer)
        except Exception as e:  # noqa: BLE001 - raised below, outside Flower's thread
            box["error"] = e

    run_simulation(server_app=server, client_app=client_app, num_supernodes=4, backend_config=backend_config(cfg))
    if "error" in box:
        raise box["error"]
    rec = box["grid"]
    with open(writer.dir / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    run = Run(cfg, writer.dir, rows, checkpoint.load(writer.dir / checkpoint.NAME), replies=rec.replies)
    run.partition = {r.metadata.src_node_id: int(r.content["info"]["partition"]) for r in rec.replies if _is(r, "info")}
    sent_train = {m.metadata.message_id for m in rec.sent if m.metadata.message_type == "train"}
    run.train_up = sum(
        wire_bytes(r) for r in rec.replies if r.metadata.reply_to_message_id in sent_train and not r.has_error()
    )
    return run


def _is(r: Message, key: str) -> bool:
    return not r.has_error() and key in r.content


def coefs(run: Run, rnd: int) -> tuple[list[int], np.ndarray]:
    (_, seeds, c) = next(h for h in run.ck["strategy"]["history"] if h[0] == rnd)
    return seeds.tolist(), c.numpy().astype(np.float64)


def raw_grads(plain: Run) -> dict[int, np.ndarray]:
    """Round 1's projected gradients of every client as the plain run received them, by partition."""
    steps, q = plain.cfg.federation.local_steps, plain.cfg.zo.q
    return {
        plain.partition[r.metadata.src_node_id]: decode_grads(r.content["update"], steps, q)
        for r in plain.replies
        if _is(r, "update")
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg")
    return federate(out, "plain", *FAST), federate(out, "secagg", *FAST, *ON)


def test_global_b_with_secagg_equals_the_plain_runs_within_the_encoding_tolerance(runs):
    plain, masked = runs
    cfg, n = masked.cfg, 4
    tol = secagg.tolerance(cfg, n)
    assert tol == pytest.approx(3 * n * 8.0 / 2**22)
    seeds, theirs = coefs(masked, 1)
    seeds_plain, ours = coefs(plain, 1)
    assert seeds == seeds_plain and len(seeds) == cfg.federation.local_steps * cfg.zo.q
    assert np.abs(theirs - ours).max() <= tol + 1e-6  # + float32 rounding of the stored coefficients
    assert np.abs(theirs - ours).max() > 0  # the masked path really ran: stochastic rounding leaves a trace
    # B = -(lr/q) sum_k coef_k z_k from the same B = 0, so |B_secagg - B_plain| <= (lr/q) tol sum_k |z_k|
    z = rng.directions(seeds, plain.ck["strategy"]["b"].numel(), cfg.zo.distribution).double()
    bound = cfg.zo.lr / cfg.zo.q * (tol + 1e-6) * z.abs().sum(0)
    diff = (masked.ck["strategy"]["b"].double() - plain.ck["strategy"]["b"].double()).abs()
    assert torch.all(diff <= bound + 1e-7), float((diff - bound).max())
    (p_row,), (m_row,) = plain.rows, masked.rows
    assert (m_row["ok"], m_row["failed"], m_row["skipped"], m_row["range_clipped"]) == ("4", "0", "False", "0.0")
    # the train loss rode inside the masked vector: the server learns only the (here equal-weight) mean
    assert float(m_row["train_loss"]) == pytest.approx(float(p_row["train_loss"]), abs=3 * n * 2 * 100 / 2**22)


def test_the_server_receives_only_masked_vectors_of_each_client_and_their_mean_is_exact(runs):
    plain, masked = runs
    raw = raw_grads(plain)  # what each client computed in round 1 (the same in both runs)
    assert sorted(raw) == [0, 1, 2, 3]
    weight = {int(p): w for p, w in masked.ck["strategy"]["weight"].items()}
    stage_replies = [r for r in masked.replies if _is(r, RECORD_KEY_CONFIGS)]
    assert len(stage_replies) == 4 * 4  # setup, share keys, collect masked vectors, unmask: one reply per client
    c, q_levels = masked.cfg.privacy.secagg_range, masked.cfg.privacy.secagg_quantization
    collected = 0
    for r in masked.replies:
        assert not _is(r, "update") and not _is(r, "check")  # no plain train reply ever reached the server
        if not _is(r, RECORD_KEY_CONFIGS):
            continue
        assert set(r.content) <= FITRES | {RECORD_KEY_CONFIGS}, set(r.content)
        wire = message_to_proto(r).SerializeToString()
        for g in raw.values():  # no client's scalar, in float32 or float64, appears in any stage reply
            for v in g.ravel():
                assert np.float32(v).tobytes() not in wire and np.float64(v).tobytes() not in wire
        if Key.MASKED_PARAMETERS not in r.content[RECORD_KEY_CONFIGS]:
            continue
        collected += 1
        part = masked.partition[r.metadata.src_node_id]
        assert len(r.content["fitres.parameters"]) == 0 and len(r.content["fitres.metrics"]) == 0
        assert float(r.content["fitres.num_examples"]["num_examples"]) == weight[part]  # the server's own weight
        _factor, vec = (bytes_to_ndarray(b) for b in r.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
        assert vec.shape == (raw[part].size + 2,)
        as_if_clear = vec.astype(np.float64) * 2 * c / q_levels - c  # what unmasked fixed point would decode to
        assert np.abs(as_if_clear[: raw[part].size] - raw[part].ravel()).min() > 0.01  # masked: nowhere near
    assert collected == 4
    total = sum(weight.values())
    mean = sum(weight[p] * raw[p].astype(np.float64).ravel() for p in raw) / total
    _, theirs = coefs(masked, 1)
    assert np.abs(theirs - mean).max() <= secagg.tolerance(masked.cfg, 4) + 1e-6  # only the mean was unmasked


def test_bytes_per_client_round_count_every_secagg_stage_message(runs):
    plain, masked = runs
    up = {"plain": float(plain.rows[0]["uplink_bytes_per_client"])}
    up["secagg"] = float(masked.rows[0]["uplink_bytes_per_client"])
    down = {"plain": float(plain.rows[0]["downlink_bytes_per_client"])}
    down["secagg"] = float(masked.rows[0]["downlink_bytes_per_client"])
    assert int(masked.rows[0]["uplink_bytes"]) == masked.train_up  # every stage reply, counted exactly
    assert int(plain.rows[0]["uplink_bytes"]) == plain.train_up
    assert up["secagg"] > 4 * up["plain"] and down["secagg"] > down["plain"]
    print(f"\nbytes per client-round (4 clients, 3 x 4 scalars): {up=} {down=}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["federation.seed_scope=client"], r"federation.seed_scope='client'.*privacy.secagg"),
        (["federation.aggregation=median"], r"federation.aggregation='median'.*privacy.secagg"),
        (["federation.norm_bound=3"], r"federation.norm_bound=3.0.*privacy.secagg"),
        (["federation.max_abs_grad=1e6"], r"federation.max_abs_grad=1000000.0.*privacy.secagg"),
        (["federation.verify=true"], r"federation.verify=True.*privacy.secagg"),
        (["federation.algorithm=fedavg_lora"], r"federation.algorithm='fedavg_lora'.*privacy.secagg"),
        (["federation.fraction=0.25"], r"federation.fraction=0.25.*privacy.secagg.*at least 2"),
        (["privacy.secagg_quantization=2147483648"], r"privacy.secagg_quantization=2147483648.*privacy.secagg"),
        (["privacy.secagg_range=0"], r"privacy.secagg_range=0"),
        (["privacy.secagg_threshold=0"], r"privacy.secagg_threshold=0"),
    ],
)
def test_settings_that_cannot_work_with_secagg_are_refused_in_one_line_naming_both(override, message):
    base = ["federation.fraction=1.0", "federation.seed_scope=round", "federation.norm_bound=0", *ON]
    with pytest.raises(ValueError, match=message) as e:
        load_config([SMOKE], [*base, *override])
    assert "\n" not in str(e.value)


def test_secagg_works_with_either_dp_mode_and_is_off_by_default():
    base = ["federation.seed_scope=round", "federation.norm_bound=0", *ON]
    assert load_config([SMOKE], [*base, "privacy.mode=central"]).privacy.secagg
    assert load_config([SMOKE], [*base, "privacy.mode=local"]).privacy.secagg
    assert not load_config([SMOKE]).privacy.secagg


def test_the_client_clips_to_the_range_counts_it_and_refuses_what_it_cannot_encode():
    cfg = load_config([SMOKE], [*FAST, *ON])
    steps, q, c = cfg.federation.local_steps, cfg.zo.q, cfg.privacy.secagg_range
    g = np.zeros((steps, q), np.float32)
    g[0, 0], g[1, 2] = 3 * c, -0.5
    vec, clipped = secagg.encode(cfg, g, loss=10.0)
    assert clipped == 1 and vec[0] == c and vec[6] == -0.5  # clipped here, counted, never by Flower silently
    assert vec[-2] == pytest.approx(10.0 * c / secagg.LOSS_RANGE) and vec[-1] == pytest.approx(c / (steps * q + 1))
    grads, loss, share = secagg.decode(cfg, vec, 1)
    assert loss == pytest.approx(10.0) and share == pytest.approx(1 / (steps * q + 1))
    assert grads.shape == (steps, q) and grads[1, 2] == -0.5
    for bad in (np.full((steps, q), np.nan), np.zeros(steps * q - 1)):
        with pytest.raises(ValueError, match="leaves the round"):
            secagg.encode(cfg, bad, loss=1.0)


def test_a_secagg_client_never_answers_a_plain_train_message(identity):
    from flwr.app import ConfigRecord, RecordDict

    cfg = load_config([SMOKE], [*FAST, *ON])
    plain = Message(RecordDict({"round": ConfigRecord({"round": 1})}), dst_node_id=1, message_type="train")
    with pytest.raises(ValueError, match="only inside SecAgg"):
        secagg.is_masked_round(cfg, plain)
    assert not secagg.is_masked_round(load_config([SMOKE]), plain)


@pytest.mark.slow
def test_drop_outs_are_unmasked_by_secagg_and_a_halted_round_is_skipped(tmp_path):
    """Injected drop-outs (round 1: client 2; round 2: 0 and 1; round 3: 1 and 2) leave in the train stage, after
    sharing their keys: SecAgg+ removes their masks. With threshold 0.75 (3 of 4 shares) rounds 2 and 3 halt."""
    faults = ["faults.drop_rate=0.2", "federation.rounds=3"]
    plain = federate(tmp_path, "plain", *FAST, *faults)
    masked = federate(tmp_path, "secagg", *FAST, *ON, *faults)
    halted = federate(tmp_path, "halted", *FAST, *ON, *faults, "privacy.secagg_threshold=0.75")
    ok = [[r["ok"], r["failed"], r["skipped"]] for r in plain.rows]
    assert ok == [["3", "1", "False"], ["2", "2", "False"], ["2", "2", "False"]]
    assert [[r["ok"], r["failed"], r["skipped"]] for r in masked.rows] == ok
    seeds, theirs = coefs(masked, 1)
    assert np.abs(theirs - coefs(plain, 1)[1]).max() <= secagg.tolerance(masked.cfg, 3) + 1e-6
    b_plain, b_masked = plain.ck["strategy"]["b"], masked.ck["strategy"]["b"]
    assert float((b_masked - b_plain).norm() / b_plain.norm()) < 1e-3  # three rounds: the gap stays at the noise
    rows = [[r["ok"], r["skipped"]] for r in halted.rows]
    assert rows == [["3", "False"], ["0", "True"], ["0", "True"]]
    assert [len(h[1]) for h in halted.ck["strategy"]["history"]] == [len(seeds), 0, 0]  # B unchanged after round 1
    assert np.abs(coefs(halted, 1)[1] - coefs(plain, 1)[1]).max() <= secagg.tolerance(masked.cfg, 3) + 1e-6
    # Flower's stochastic rounding is seeded per run, round and client: the same round 1 gives the same numbers
    assert np.array_equal(coefs(halted, 1)[1], coefs(masked, 1)[1])
