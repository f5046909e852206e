"""Personalization: validation split, the step rule, methods chosen on validation, Ditto, newcomers, privacy.

The federation tests are real Flower simulations on Ray with the tiny model (configs/smoke.yaml).
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedprge.config import load_config, to_yaml
from fedprge.data import encode, load_federated
from fedprge.engine.estimator import ZOConfig, clip_rms, finish_step
from fedprge.engine.seeds import step_seeds
from fedprge.federation import client_app
from fedprge.federation.protocol import GlobalState
from fedprge.federation.sampling import sample_round, unseen_clients
from fedprge.personalize import MIX_WEIGHTS, PRIOR_WEIGHTS, TOKEN_PRIOR_WEIGHTS, mix, personalize, prior
from fedprge.results import RunWriter
from fedprge.simulate import simulate
from fedprge.task import Task, checkpoints

SMOKE = "configs/smoke.yaml"
ALL = "eval.personalization=[global,finetune,local,personal,ditto,mix,prior]"


@pytest.fixture(scope="module")
def task() -> Task:
    return Task(load_config([SMOKE], ["data.max_train_per_client=24", "eval.personal_steps=4"]))


@pytest.mark.parametrize(
    ("name", "partition", "extra"),
    [("shakespeare", "natural", {}), ("tweets", "dirichlet", {"alpha": 0.1})],
)
def test_validation_split_is_carved_from_training_data_and_never_overlaps_test(name, partition, extra):
    plain = load_federated(name, 6, partition, seed=3, **extra)
    data = load_federated(name, 6, partition, seed=3, val_fraction=0.2, max_val_per_client=8, **extra)
    for before, c in zip(plain.clients, data.clients, strict=True):
        assert 1 <= len(c.val) <= 8 and c.train, c.client_id
        assert c.test == before.test  # the test split is untouched
        assert c.train + c.val == before.train  # val is the tail of the training data, which no longer has it
        ids = lambda xs: {id(x) for x in xs}  # noqa: E731 - identity: Shakespeare chunks may repeat as text
        assert not ids(c.val) & ids(c.test) and not ids(c.val) & ids(c.train)


def test_clip_rms_bounds_the_step_and_leaves_small_gradients_alone():
    g = torch.tensor([30.0, -10.0, 0.5, 4.0])
    clipped = clip_rms(g, 2.0)
    assert float(clipped.pow(2).mean().sqrt()) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(clipped / clipped.norm(), g / g.norm())  # same direction
    small = torch.tensor([0.3, -1.0, 0.2, 0.1])
    assert torch.equal(clip_rms(small, 2.0), small)
    assert torch.equal(clip_rms(g, 0.0), g)  # 0: off


def test_the_step_sends_and_applies_the_clipped_scalars():
    b, z = torch.zeros(50), torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    losses = torch.tensor([5.0, 4.0, 4.6, 4.2])  # g = (20, -10): rms 15.8, way above clip 2
    cfg = ZOConfig(q=2, eps=0.01, lr=0.1, clip=2.0)
    new_b, rec = finish_step(b, z, [1, 2], losses, cfg)
    g = torch.tensor(rec.projected_grads)
    assert float(g.pow(2).mean().sqrt()) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(new_b, b - 0.1 / 2 * (g[0] * z[0] + g[1] * z[1]))  # what the server replays


def test_local_adaptation_keeps_the_step_count_with_the_lowest_validation_loss(task):
    b0 = torch.zeros(task.num_params)
    trail: dict[int, torch.Tensor] = {}
    b, k = task.adapt(b0, 1, 4, tag=1, trail=trail)
    assert sorted(trail) == checkpoints(4) == [0, 1, 2, 4]
    val = {s: task.validation_loss(state, 1) for s, state in trail.items()}
    assert k == min(val, key=val.get) and torch.equal(b, trail[k])
    assert val[k] <= val[0]  # 0 steps is a candidate: adaptation never ends worse than its start on validation
    assert torch.equal(trail[4], task.local_steps(b0, 1, 4, tag=1))  # the trail is the plain trajectory


def test_a_b_state_is_evaluated_once_per_split_and_gives_the_numbers_of_a_fresh_evaluation(task):
    calls = []
    nll = task.backend.token_nll
    task.backend.token_nll = lambda b, batch: calls.append(1) or nll(b, batch)  # counts the real forwards
    try:
        b = torch.full((task.num_params,), 1e-3)
        first, val = task.evaluate(b, 3), task.validation_loss(b, 3)
        n = len(calls)
        assert n > 0 and task.evaluate(b.clone(), 3) == first and task.validation_loss(b.clone(), 3) == val
        assert len(calls) == n  # the same values again: no forward
        task.evaluate(b, 2)
        other = task.evaluate(b + 1e-3, 3)  # another client, another B: forwards again, other numbers
        assert len(calls) > n + 1 and other != first
        # prior rescores finetune's tokens: after finetune's selection and test, not one forward more
        states = personalize(task, ["finetune"], b, 1)
        task.evaluate(states["finetune"].b, 1)
        n = len(calls)
        p = personalize(task, ["finetune", "prior"], b, 1)["prior"]
        assert p.chosen["lambda"] > 0 and task.evaluate(p.b, 1, token_prior=p.token_prior) != task.evaluate(p.b, 1)
        assert len(calls) == n
    finally:
        task.backend.token_nll = nll
    fresh = Task(task.cfg, task.backend, task.tokenizer)
    assert fresh.evaluate(b, 3) == first and fresh.validation_loss(b, 3) == val
    # the loss from the per-token pass is, bit for bit, the per-example sums' (what a .pte backend gives)
    test = task.client(3).test
    sums, counts = task.backend.example_nll(b, encode(task.tokenizer, test, task.cfg.data.max_len))
    assert len(test) <= 16 and first["loss"] == float(sums.sum()) / int(counts.sum())


def test_mix_takes_the_weight_of_lowest_validation_loss(task):
    g = torch.zeros(task.num_params)
    own = task.local_steps(g, 2, 4, tag=7)
    got = mix(task, g, own, 2)
    losses = {a: task.validation_loss(torch.lerp(g, own, a), 2) for a in MIX_WEIGHTS}
    assert got.chosen["alpha"] == min(losses, key=losses.get)
    torch.testing.assert_close(got.b, torch.lerp(g, own, got.chosen["alpha"]), rtol=0, atol=0)


def test_ditto_pulls_toward_the_global_b_by_exactly_lr_lambda(task):
    b, anchor = torch.ones(task.num_params), torch.zeros(task.num_params)
    lam, lr = task.cfg.eval.ditto_lambda, task.zo.lr
    torch.testing.assert_close(task.prox(b, anchor), b * (1 - lr * lam), rtol=0, atol=1e-7)
    # a newcomer's Ditto B: personal_steps P-RGE steps, each followed by that pull
    out = personalize(task, ["ditto", "global"], anchor, 0)
    assert out["ditto"].chosen == {"trained": 0.0} and torch.equal(out["global"].b, anchor)
    torch.testing.assert_close(out["ditto"].b, task.local_steps(anchor, 0, task.cfg.eval.personal_steps, 3, anchor))


def test_unseen_clients_are_never_sampled_and_nobody_else_changes_when_there_are_none():
    cfg = load_config([SMOKE], ["federation.clients=20", "eval.unseen_fraction=0.2"])
    unseen = unseen_clients(cfg, 20)
    assert len(unseen) == 4
    sampled = {i for r in range(1, 60) for i in sample_round(cfg, 20, r)}
    assert sampled == set(range(20)) - set(unseen)
    plain = load_config([SMOKE], ["federation.clients=20"])
    assert unseen_clients(plain, 20) == []
    gen = lambda r: sorted(np.random.default_rng([0, r]).choice(20, 10, replace=False).tolist())  # noqa: E731
    assert all(sample_round(plain, 20, r) == gen(r) for r in range(1, 6))  # the pre-newcomer schedule


def _run(tmp_path, name, *overrides):
    cfg = load_config([SMOKE], [f"name={name}", *overrides])
    writer = RunWriter(cfg, out=tmp_path / name, progress=False)
    summary = simulate(cfg, writer)
    with open(writer.dir / "clients.csv") as f:
        clients = {int(r["partition"]): {k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)}
    with open(writer.dir / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    return summary, clients, rounds


@pytest.mark.slow
def test_personalization_changes_neither_the_uplink_nor_the_federation_and_newcomers_never_train(tmp_path):
    base = ["federation.clients=5", "eval.every=0", "federation.verify=true", "zo.clip=0.05"]
    plain, _, rounds = _run(tmp_path, "plain", *base, "eval.personalization=[global]")
    full, clients, _ = _run(tmp_path, "full", *base, ALL, "eval.unseen_fraction=0.2")
    unseen = unseen_clients(load_config([SMOKE], ["federation.clients=5", "eval.unseen_fraction=0.2"]), 5)
    # every step clipped (clip 0.05 is far below the tiny model's rms(g)), and the server's replay is still exact
    assert all(float(r["reconstruction_error"]) <= 1e-6 for r in rounds), rounds
    # the personal and Ditto B's never travel: the uplink is byte for byte the plain run's, and so is the global B
    # (newcomers change the sample, so the comparison is against a plain run of the same newcomers)
    same, _, _ = _run(tmp_path, "same", *base, "eval.personalization=[global]", "eval.unseen_fraction=0.2")
    assert full["payload_bytes"]["train_up"] == same["payload_bytes"]["train_up"]  # metadata (ids, times) varies
    assert full["b_sha256"] == same["b_sha256"] != plain["b_sha256"]
    assert full["clients_evaluated"] == 5 and len(unseen) == 1
    (new,) = unseen
    assert clients[new]["personal_loss"] == clients[new]["global_loss"]  # it never trained: no personal B
    assert full["unseen_clients"] == [new] and full["methods_unseen"]["mix"]["clients"] == 1
    assert full["methods_trained"]["mix"]["clients"] == 4
    assert full["methods_unseen"]["global"]["mean"] == clients[new]["global_loss"]
    assert clients[new]["ditto_trained"] == 0.0 and all(clients[p]["ditto_trained"] == 1.0 for p in clients if p != new)


def test_the_train_reply_carries_only_the_scalars_while_the_ditto_b_stays_home(identity):
    cfg = load_config([SMOKE], [ALL])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    context.state["setup"] = ConfigRecord({"config": to_yaml(cfg)})
    state = GlobalState("weights", b=torch.zeros(client_app.task_of(context).num_params))
    content = RecordDict({"round": ConfigRecord({"round": 1, "downlink": "weights"}), "state": state.to_record()})
    reply = client_app.train(Message(content, dst_node_id=7, message_type="train", group_id="1"), context)
    assert set(reply.content.keys()) == {"update", "metrics"}
    assert set(reply.content["update"].keys()) == {"projected_grads", "num_examples"}
    q, steps = cfg.zo.q, cfg.federation.local_steps
    assert len(reply.content["update"]["projected_grads"]) == 4 * q * steps
    ditto = context.state["ditto"]["b"].numpy()
    assert np.abs(ditto).sum() > 0 and ditto.tobytes() not in bytes(reply.content["update"]["projected_grads"])
    assert len(step_seeds(client_app.task_of(context).spec, 1, 0, 0)) == q


@pytest.mark.slow
def test_export_personal_keeps_each_clients_personalized_b_and_writes_its_peft_adapter(tmp_path):
    over = ["eval.every=0", "eval.personalization=[global,finetune]", "export.personal=finetune"]
    cfg = load_config([SMOKE], [f"name={'pers'}", *over])
    writer = RunWriter(cfg, out=tmp_path / "pers", progress=False)
    simulate(cfg, writer)
    task, b_global = Task(cfg), torch.load(writer.dir / "global_b.pt")
    for p in range(cfg.federation.clients):
        kept = torch.load(writer.dir / "personal" / f"client-{p}.pt")
        want, _ = task.adapt(b_global, p, cfg.eval.personal_steps, tag=1)  # what the client's finetune computed
        assert torch.equal(kept, want), p
        assert (writer.dir / "adapters" / f"client-{p}" / "adapter_model.safetensors").exists()


def test_prior_shifts_the_decision_by_the_clients_own_label_frequencies():
    tw = Task(load_config([SMOKE], ["data.task=tweets", "data.partition=dirichlet", "data.alpha=0.1"]))
    b = torch.zeros(tw.num_params)
    c = tw.client(3)
    got = prior(tw, b, 3)
    counts = torch.tensor([sum(ex.target == ch for ex in c.train) for ch in c.train[0].choices], dtype=torch.float32)
    log_pi = torch.log((counts + 1) / (counts.sum() + 3))
    logits, target = -tw.choice_scores(b, c.val), torch.tensor([c.train[0].choices.index(e.target) for e in c.val])
    xent = {t: float(torch.nn.functional.cross_entropy(logits + t * log_pi, target)) for t in PRIOR_WEIGHTS}
    assert got.chosen["tau"] == min(xent, key=xent.get) > 0  # this client is skewed: its prior helps on validation
    torch.testing.assert_close(torch.tensor(got.label_bias), got.chosen["tau"] * log_pi)
    scores = tw.choice_scores(b, c.test) - torch.tensor(got.label_bias)
    want = sum(c.test[i].choices[j] == c.test[i].target for i, j in enumerate(scores.argmin(1).tolist())) / len(c.test)
    assert tw.evaluate(b, 3, got.label_bias)["acc"] == want
    assert tw.evaluate(b, 3, got.label_bias)["loss"] == tw.evaluate(b, 3)["loss"]  # the shift is a decision rule only
    assert prior(Task(load_config([SMOKE])), b, 0).label_bias is None  # language modelling: no label decision


def _target_probs(task: Task, b: torch.Tensor, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's probability of every scored target token, and the token ids, from the full logits (float64)."""
    probs, ids = [], []
    for ex in examples:
        batch = encode(task.tokenizer, [ex], task.cfg.data.max_len)
        with torch.no_grad(), task.backend.lora.use(b.reshape(1, -1)):
            logits = task.backend.model(input_ids=batch["input_ids"]).logits[0, :-1].double()
        t = batch["labels"][0, 1:]
        probs.append(logits.softmax(-1)[t != -100].gather(1, t[t != -100, None])[:, 0])
        ids.append(t[t != -100])
    return torch.cat(probs), torch.cat(ids)


def test_prior_mixes_the_clients_own_unigram_into_the_next_token_distribution(task):
    """Language modelling: p = (1 - lam) p_model + lam pi, pi the client's training-target token frequencies, lam
    of lowest validation loss. The tiny random model is near uniform over 49,152 tokens (loss 10.8), so a client's
    unigram helps a lot: lam > 0, and the test loss drops by more than a nat."""
    p, b = 1, torch.zeros(task.num_params)
    c = task.client(p)
    got = prior(task, b, p)
    scored = [ids for ex in c.train for ids in [encode(task.tokenizer, [ex], task.cfg.data.max_len)["labels"][0, 1:]]]
    counts = Counter(int(t) for ids in scored for t in ids if t != -100)
    pi, lam = got.token_prior
    assert {int(t): float(pi[t]) for t in pi.nonzero()[:, 0]} == pytest.approx(
        {t: n / sum(counts.values()) for t, n in counts.items()}, rel=1e-6
    )

    def mixed(examples, w):  # mean NLL under the mixture, from the model's full softmax
        probs, ids = _target_probs(task, b, examples)
        return float(-torch.log((1 - w) * probs + w * pi.double()[ids]).mean())

    val = {w: mixed(c.val, w) for w in TOKEN_PRIOR_WEIGHTS}
    assert lam == min(val, key=val.get) > 0 and got.chosen == {"lambda": lam}
    plain = task.evaluate(b, p)["loss"]
    assert task.evaluate(b, p, token_prior=(pi, lam))["loss"] == pytest.approx(mixed(c.test, lam), abs=1e-4)
    assert plain == pytest.approx(mixed(c.test, 0.0), abs=1e-4)
    assert plain - mixed(c.test, lam) > 1.0
    assert task.evaluate(b, p, token_prior=(pi, 0.0))["loss"] == plain  # weight 0: the model alone
    out = personalize(task, ["finetune", "prior"], b, p)  # prior mixes into finetune's B
    assert torch.equal(out["prior"].b, out["finetune"].b)


@pytest.mark.slow
def test_the_study_script_tables_every_method_each_run_evaluated(tmp_path):
    """simulations/personalization.py --quick: one tiny run per setting; the table has a row per method the run
    evaluated (the main-job setting has no Ditto), for trained clients and newcomers apart, and the plot."""
    import subprocess
    import sys

    cmd = [sys.executable, "simulations/personalization.py", "--quick", "--seeds", "0", "--out", str(tmp_path)]
    subprocess.run([*cmd, "--settings", "shakespeare", "tweets-0.1"], check=True, timeout=900)
    rows = json.loads((tmp_path / "personalization.json").read_text())
    got = {(r["setting"], r["clients"], r["method"]) for r in rows}
    main_job = {"untuned", "global", "finetune", "local", "personal", "prior"}
    assert {m for s, g, m in got if s == "shakespeare"} == main_job
    assert {m for s, g, m in got if s == "tweets-0.1" and g == "trained"} == main_job | {"ditto", "mix"}
    assert {g for s, g, m in got if s == "tweets-0.1"} == {"trained", "unseen"}
    prior_row = next(r for r in rows if r["setting"] == "shakespeare" and r["method"] == "prior")
    assert prior_row["loss_no_worse_than_untuned"] == 1.0 and prior_row["uplink_B_per_client_round"] > 0
    global_row = next(r for r in rows if r["setting"] == "shakespeare" and r["method"] == "global")
    # the paired gain (loss: global minus method, per client) is the difference of the means on the same clients
    assert prior_row["gain_over_global"] == pytest.approx(global_row["mean"] - prior_row["mean"], abs=1e-9)
    assert global_row["gain_over_global"] == 0.0
    assert (tmp_path / "personalization.png").stat().st_size > 10_000
