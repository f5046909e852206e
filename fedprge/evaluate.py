"""Held-out metrics of a B state on a client's examples: token loss / perplexity, and label accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedprge.data import Example, encode
from fedprge.engine.backend import Backend, example_sums


@dataclass(frozen=True)
class Scores:
    """One pass over a split: the summed NLL of its target tokens and their count (as ``example_nll`` gives them),
    and from a per-token backend every target token's NLL and id, which a token prior rescores without a forward."""

    total: float
    count: int
    nll: torch.Tensor | None = None
    tgt: torch.Tensor | None = None


def score(
    backend: Backend, tokenizer, b: torch.Tensor, examples: Sequence[Example], max_len: int, batch_size: int = 16
) -> Scores:
    """:class:`Scores` of ``b`` on ``examples``: one forward per ``batch_size`` examples."""
    total, count, nlls, tgts = 0.0, 0, [], []
    for i in range(0, len(examples), batch_size):
        batch = encode(tokenizer, examples[i : i + batch_size], max_len)
        if backend.per_token:
            nll, tgt = backend.token_nll(b, batch)
            sums, counts = example_sums(nll.unsqueeze(0), batch)
            sums = sums[0]
            nlls.append(nll)
            tgts.append(tgt)
        else:
            sums, counts = backend.example_nll(b, batch)
        total += float(sums.sum())
        count += int(counts.sum())
    if not nlls:
        return Scores(total, count)
    return Scores(total, count, torch.cat(nlls), torch.cat(tgts))


def evaluate(
    backend: Backend,
    tokenizer,
    b: torch.Tensor,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
    with_acc: bool = True,
    label_bias: Sequence[float] | None = None,
    token_prior: tuple[torch.Tensor, float] | None = None,
    scores: Scores | None = None,
) -> dict[str, float]:
    """``loss`` (mean NLL per target token), ``ppl``; for examples with choices (and ``with_acc``) also ``acc``: the
    label word with the highest log-likelihood must be the target (scored by the same forward as training);
    ``label_bias`` (one per choice) is added to the choices' log-likelihoods first (a client's label prior);
    ``token_prior`` ``(pi, lam)`` scores the tokens under ``(1 - lam) p_model + lam pi`` (a client's token prior).
    ``scores``: the :func:`score` of ``b`` on ``examples`` when the caller has it (no forward for the loss)."""
    if not examples:
        return {}
    scores = scores or score(backend, tokenizer, b, examples, max_len, batch_size)
    total, count = scores.total, scores.count
    if token_prior is not None and token_prior[1] > 0:
        if scores.nll is None or scores.tgt is None:
            raise ValueError("a token prior needs per-token losses; this backend gives per-example sums only")
        total, count = float(mixture_nll(scores.nll, scores.tgt, *token_prior).sum()), len(scores.nll)
    out = {"loss": total / max(count, 1)}
    out["ppl"] = math.exp(min(out["loss"], 50.0))
    if with_acc and examples[0].choices:
        nll = choice_scores(backend, tokenizer, b, examples, max_len, batch_size)
        if label_bias is not None:
            nll = nll - torch.tensor(label_bias, dtype=nll.dtype)
        pred = nll.argmin(1).tolist()
        out["acc"] = sum(ex.choices[p] == ex.target for ex, p in zip(examples, pred, strict=True)) / len(examples)
    return out


def choice_scores(
    backend: Backend, tokenizer, b: torch.Tensor, examples: Sequence[Example], max_len: int, batch_size: int = 16
) -> torch.Tensor:
    """(examples, choices): the mean NLL per token of each choice after each example's prompt (lower: likelier)."""
    cands = [Example(ex.prompt, c, ex.choices) for ex in examples for c in ex.choices]
    return torch.cat(
        [_mean_nll(backend, tokenizer, b, cands[i : i + batch_size], max_len) for i in range(0, len(cands), batch_size)]
    ).reshape(len(examples), len(examples[0].choices))


def _mean_nll(backend: Backend, tokenizer, b: torch.Tensor, examples: Sequence[Example], max_len: int):
    sums, counts = backend.example_nll(b, encode(tokenizer, examples, max_len))
    return sums / counts.clamp(min=1)


def mixture_nll(nll: torch.Tensor, tgt: torch.Tensor, pi: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-token NLL under ``(1 - lam) p_model + lam pi`` from the model's NLL ``nll`` of the targets ``tgt``."""
    if lam <= 0:
        return nll
    return -torch.logaddexp(math.log1p(-lam) - nll, torch.log(lam * pi[tgt]))
