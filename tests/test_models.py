"""Tests for fedprge.models: the tiny random Llama, the committed tokenizer, local folders, and SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from fedprge.models import MODEL_CHOICES, TOKENIZER_ASSET, load_model, load_tokenizer, tiny_llama

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
TEXTS = [
    SENTENCE,
    "  leading spaces\n\ttabs and newlines\r\n",
    "Ünïcödé — emojis 🤗🚀, 中文, العربية, 3.14159",
    "def f(x):\n    return x**2  # code",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_ready(model: torch.nn.Module, dtype: torch.dtype) -> None:
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False


def test_every_named_choice_is_a_model_and_other_names_must_be_folders(tmp_path, monkeypatch):
    """A name in MODEL_CHOICES never touches the file system; any other name is a path, even when it looks like a
    model (a folder called 'smollm3' in the working directory is not a choice)."""
    monkeypatch.chdir(tmp_path)
    for name in MODEL_CHOICES:
        assert len(load_tokenizer(name)) == 49152  # the committed tokenizer, no folder named `name` exists here
    with pytest.raises(ValueError, match=r"tokenizer 'smollm3': no such path") as err:
        load_tokenizer("smollm3")
    assert all(name in str(err.value) for name in MODEL_CHOICES)  # the error lists the choices


def test_tokenizer_asset(tok):
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in TOKENIZER_ASSET.iterdir()}
    assert len(tok) == 49152
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.eos_token_id is not None
    assert tok.padding_side == "right"
    assert load_tokenizer("smollm2").get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids and all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_specials_and_chat(tok):
    # Special tokens are single ids; the chat template wraps turns in them.
    assert len(tok("<|im_end|>")["input_ids"]) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


def test_tokenizer_right_padding(tok):
    batch = tok(["short", SENTENCE], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0
    assert (batch["input_ids"][0][mask[0] == 0] == tok.pad_token_id).all()


def test_tiny_deterministic(tok):
    before = torch.random.get_rng_state()
    a, b, c = tiny_llama(tok, seed=0), tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG state was touched"
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_shape_and_forward(tok):
    model, tok2 = load_model("tiny", seed=3)
    _assert_ready(model, torch.float32)
    cfg = model.config
    assert cfg.vocab_size == len(tok2) == 49152
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Same seed through load_model and tiny_llama gives the same weights.
    ref = _state(tiny_llama(tok, seed=3))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())

    batch = tok2(["hello world", SENTENCE], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok2))
    assert torch.isfinite(out.logits).all()
    # A random model over 49,152 tokens should be near-uniform: loss close to ln(V) ~ 10.8.
    assert abs(out.loss.item() - torch.log(torch.tensor(49152.0)).item()) < 1.0


def test_tiny_custom_size(tok):
    model = tiny_llama(tok, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    _assert_ready(model, torch.float32)


def test_tiny_dtype():
    model, _ = load_model("tiny", dtype=torch.bfloat16)
    _assert_ready(model, torch.bfloat16)


def test_load_saved_folder(tmp_path, tok):
    model, tok1 = load_model("tiny", seed=7)
    model.save_pretrained(tmp_path)
    tok1.save_pretrained(tmp_path)
    reloaded, tok2 = load_model(str(tmp_path))
    _assert_ready(reloaded, torch.float32)
    assert tok2.padding_side == "right" and tok2.pad_token_id == tok1.pad_token_id
    assert tok2(SENTENCE)["input_ids"] == tok1(SENTENCE)["input_ids"]
    batch = tok1([SENTENCE, "a shorter one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.equal(want, got)


def test_missing_path_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError) as err:
        load_model(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "tiny" in msg and "smollm2" in msg
    with pytest.raises(ValueError, match="no-such-model"):
        load_tokenizer(str(missing))


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        load_model(str(afile))
    # A vision config: a valid HF folder, but not a causal LM.
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(ValueError, match="causal LM"):
        load_model(str(vit))


def test_folder_without_weights(tmp_path, tok):
    model = tiny_llama(tok)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="causal LM"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer(tmp_path, tok):
    tiny_llama(tok).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2():
    """Real SmolLM2-135M-Instruct (dequantised Q4_1): first run converts the GGUF (~15 s), then cached."""
    model, tok = load_model("smollm2")
    _assert_ready(model, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings
    assert len(tok) == model.config.vocab_size == 49152
    batch = tok(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    # A random model gives ~10.8 (ln 49152); the notes report 3.197 for these weights.
    assert 1.0 < loss < 5.0, loss


@pytest.mark.slow
def test_tokenizer_asset_matches_gguf(tok):
    """The committed tokenizer encodes and decodes exactly like the one inside the SmolLM2 GGUF."""
    from transformers import AutoTokenizer

    from fedprge.models import SMOLLM2_GGUF
    from fedprge.packages import package_file

    gguf = package_file(*SMOLLM2_GGUF)
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    assert ref.get_vocab() == tok.get_vocab()
    assert (ref.eos_token, ref.bos_token) == (tok.eos_token, tok.bos_token)
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert tok(text)["input_ids"] == ids
        assert tok.decode(ids) == ref.decode(ids)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
