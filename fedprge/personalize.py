"""Personalization: how a client turns the global B, and what it kept for itself, into its own B.

Every method runs on the client with forwards only (P-RGE steps and validation losses) and nothing it produces
travels: the uplink stays the training scalars. The hyper-parameters (how many local steps, how much to mix) are
chosen per client on its validation split, carved from its training data (``data.val_fraction``), never on test.

| method     | the client's B                                                                                 |
|------------|------------------------------------------------------------------------------------------------|
| `global`   | the federation's global B                                                                      |
| `finetune` | global B + up to ``eval.personal_steps`` local steps, the count chosen on validation (0 allowed) |
| `local`    | zero B + the same, no federation at all                                                        |
| `personal` | the B the client ended its last training round with (global if it never trained)              |
| `ditto`    | Ditto: a personal B trained next to the global one every round the client is sampled, pulled   |
|            | toward the round's global B by ``eval.ditto_lambda``; a newcomer gets ``personal_steps`` such steps |
| `mix`      | APFL-style ``(1 - a) * global + a * ditto`` with ``a`` in :data:`MIX_WEIGHTS` chosen on validation |
| `prior`    | ``finetune``'s B and a personal output prior fit by counting the client's training targets, its |
|            | weight chosen on validation. Classification: the label decision uses log p(label | x) +         |
|            | tau * log pi(label), pi the add-one-smoothed label frequencies, tau in :data:`PRIOR_WEIGHTS`.    |
|            | Language modelling: tokens are scored under (1 - lam) p(token | x) + lam * pi(token), pi the     |
|            | client's unigram frequencies, lam in :data:`TOKEN_PRIOR_WEIGHTS` (unigram-cache adaptation)     |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedprge.data import encode
from fedprge.evaluate import mixture_nll
from fedprge.task import Task

MIX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PRIOR_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
TOKEN_PRIOR_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)
TRAINED_IN_ROUNDS = ("ditto", "mix")  # methods whose clients keep a Ditto B while the federation trains
_FINETUNE, _LOCAL, _NEWCOMER = 1, 2, 3  # private seed tags of the local steps


@dataclass
class Personalized:
    b: torch.Tensor
    chosen: dict[str, float] = field(default_factory=dict)  # the hyper-parameters picked on validation
    trail: dict[int, torch.Tensor] = field(default_factory=dict)  # eval.trace: the state after k local steps
    label_bias: list[float] | None = None  # added to the choices' log-likelihoods before the decision ("prior")
    token_prior: tuple[torch.Tensor, float] | None = None  # (unigram pi, weight lam) the tokens are mixed with


def personalize(
    task: Task,
    methods: list[str],
    b_global: torch.Tensor,
    partition: int,
    personal: torch.Tensor | None = None,
    ditto: torch.Tensor | None = None,
) -> dict[str, Personalized]:
    """The B of every requested method for client ``partition`` (see the module table)."""
    steps, out = task.cfg.eval.personal_steps, {}

    def ditto_b() -> torch.Tensor:
        if "ditto" not in out:
            b = ditto if ditto is not None else task.local_steps(b_global, partition, steps, _NEWCOMER, b_global)
            out["ditto"] = Personalized(b, {"trained": float(ditto is not None)})
        return out["ditto"].b

    for method in methods:
        if method == "global":
            out[method] = Personalized(b_global)
        elif method in ("finetune", "local"):
            start, tag = (b_global, _FINETUNE) if method == "finetune" else (torch.zeros_like(b_global), _LOCAL)
            trail: dict[int, torch.Tensor] | None = {} if task.cfg.eval.trace else None
            b, k = task.adapt(start, partition, steps, tag, trail=trail)
            out[method] = Personalized(b, {"steps": k}, trail or {})
        elif method == "prior":
            tuned = out["finetune"].b if "finetune" in out else task.adapt(b_global, partition, steps, _FINETUNE)[0]
            out[method] = prior(task, tuned, partition)
        elif method == "personal":
            out[method] = Personalized(personal if personal is not None else b_global)
        elif method == "ditto":
            ditto_b()
        elif method == "mix":
            out[method] = mix(task, b_global, ditto_b(), partition)
        else:
            raise ValueError(f"unknown personalization method {method!r}")
    return {m: out[m] for m in methods}


def mix(task: Task, b_global: torch.Tensor, b_own: torch.Tensor, partition: int) -> Personalized:
    """``(1 - a) b_global + a b_own`` with the weight ``a`` of lowest validation loss (global without a split)."""
    if not task.client(partition).val:
        return Personalized(b_global, {"alpha": 0.0})
    scored = [(task.validation_loss(torch.lerp(b_global, b_own, a), partition), a) for a in MIX_WEIGHTS]
    _, a = min(scored)
    return Personalized(torch.lerp(b_global, b_own, a), {"alpha": a})


def prior(task: Task, b: torch.Tensor, partition: int) -> Personalized:
    """``b`` with the client's output prior of the module table, its weight chosen on validation."""
    c = task.client(partition)
    if not (c.train and c.val):
        return Personalized(b)
    if not c.train[0].choices:
        return token_prior(task, b, partition)
    choices = c.train[0].choices
    counts = torch.tensor([sum(ex.target == ch for ex in c.train) for ch in choices], dtype=torch.float32)
    log_pi = torch.log((counts + 1) / (counts.sum() + len(choices)))
    logits = -task.choice_scores(b, c.val)  # the choices' mean log-likelihoods, (val, choices)
    target = torch.tensor([choices.index(ex.target) for ex in c.val])
    xent = {t: float(F.cross_entropy(logits + t * log_pi, target)) for t in PRIOR_WEIGHTS}
    tau = min(PRIOR_WEIGHTS, key=lambda t: (xent[t], t))
    return Personalized(b, {"tau": tau}, label_bias=(tau * log_pi).tolist())


def token_prior(task: Task, b: torch.Tensor, partition: int) -> Personalized:
    """Language modelling: ``b`` and the client's unigram ``pi`` (target-token frequencies of its training
    examples), mixed into the next-token distribution with the weight of lowest validation loss."""
    if not task.backend.per_token:  # an exported .pte gives per-example sums only: prior is finetune, said so
        return Personalized(b, {"unavailable": 1.0})
    c, max_len = task.client(partition), task.cfg.data.max_len
    labels = encode(task.tokenizer, c.train, max_len)["labels"][:, 1:]  # the tokens a loss is taken on
    pi = torch.bincount(labels[labels != -100], minlength=len(task.tokenizer)).float()
    pi /= pi.sum().clamp(min=1)
    val = task.scores(b, partition, "val")  # the forward finetune's selection already paid for
    loss = {lam: float(mixture_nll(val.nll, val.tgt, pi, lam).mean()) for lam in TOKEN_PRIOR_WEIGHTS}
    lam = min(TOKEN_PRIOR_WEIGHTS, key=lambda w: (loss[w], w))
    return Personalized(b, {"lambda": lam}, token_prior=(pi, lam))
