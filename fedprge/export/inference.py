"""An ExecuTorch inference program of a (merged) causal LM, and greedy generation with ExecuTorch's runtime.

The program has one method, ``forward(tokens (1, T) int64, pos (1,) int64) -> logits (1, V) float32``: the
next-token logits after position ``pos`` of a right-padded sequence of the static length T. Attention is
causal, so the padding after ``pos`` cannot change them and no attention mask is needed. There is no KV
cache: every new token runs the full T positions, which keeps the program one static graph.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedprge.export.lower import check_backend, spec_path
from fedprge.export.runtime import native, set_threads

KIND = "next-token"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceSpec:
    """What an inference .pte was exported with; written next to it as JSON."""

    kind: str
    seq_len: int
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int
    backend: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise ValueError(f"max_len={max_len!r} is invalid; the program's static length must be an integer >= 2")


class NextTokenProgram(nn.Module):
    """``(tokens (1, T), pos (1,)) -> (1, V)`` logits of the token after ``pos``; the model's own head and caps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, use_cache=False, logits_to_keep=pos).logits
        return logits.reshape(1, -1).float()


def lower_inference(model: nn.Module, max_len: int, backend: str = "xnnpack") -> bytes:
    """The .pte bytes of :class:`NextTokenProgram` over ``model`` with static length ``max_len``."""
    from executorch.exir import to_edge_transform_and_lower

    check_backend(backend)
    check_max_len(max_len)
    inputs = (torch.zeros(1, max_len, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with torch.no_grad():
        exported = torch.export.export(NextTokenProgram(model).eval(), inputs)
    partitioner = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]
    return to_edge_transform_and_lower(exported, partitioner=partitioner).to_executorch().buffer


def export_inference_pte(
    model: nn.Module, tokenizer, out: str | Path, max_len: int = 128, backend: str = "xnnpack"
) -> Path:
    """Write ``out`` (.pte) and its spec (.json) for ``model`` (float32, eval); returns the .pte path."""
    out = Path(out)
    start = time.perf_counter()
    data = lower_inference(model.eval(), max_len, backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    spec = InferenceSpec(KIND, max_len, vocab, tokenizer.eos_token_id, int(tokenizer.pad_token_id or 0), backend)
    spec.save(spec_path(out))
    log.info("exported %s in %.1f s", out, time.perf_counter() - start)
    return out


class InferencePTE:
    """A next-token .pte loaded with ExecuTorch's runtime: :meth:`next_logits` and greedy :meth:`generate_ids`."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"inference program {str(self.path)!r} does not exist; export it with --pte")
        if num_threads is not None:
            set_threads(num_threads)
        program = native()._load_program(str(self.path))
        names = [program.get_method_name(i) for i in range(program.num_methods())]
        meta = program.method_meta("forward") if "forward" in names else None
        if meta is None or meta.num_inputs() != 2:
            raise ValueError(
                f"{str(self.path)!r} is not a next-token program (methods {names}); a P-RGE training .pte cannot "
                "generate: export one with python -m fedprge.export adapters RUN_DIR --pte"
            )
        _, self.seq_len = meta.input_tensor_meta(0).sizes()
        self.method = program.load_method("forward")
        sidecar = spec_path(self.path)
        spec = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self.pad_token_id = int(spec.get("pad_token_id", 0))
        self.eos_token_id = spec.get("eos_token_id")

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """(V,) logits of the token that follows ``ids`` (1 <= len(ids) <= seq_len)."""
        if not 1 <= len(ids) <= self.seq_len:
            raise ValueError(
                f"a sequence of {len(ids)} tokens does not fit {self.path.name} (1 to {self.seq_len} tokens); "
                "export with a larger --max-len"
            )
        tokens = torch.full((1, self.seq_len), self.pad_token_id, dtype=torch.int64)
        tokens[0, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
        pos = torch.tensor([len(ids) - 1], dtype=torch.int64)
        return self.method((tokens, pos))[0].reshape(-1).clone()

    def generate_ids(self, ids: list[int], n: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation: up to ``n`` new token ids after ``ids`` (stops after ``eos_token_id``)."""
        if len(ids) + n > self.seq_len:
            raise ValueError(
                f"{len(ids)} prompt tokens + {n} new tokens exceed the program's {self.seq_len}; "
                "export with a larger --max-len or ask for fewer tokens"
            )
        ids, new = list(ids), []
        for _ in range(n):
            token = int(self.next_logits(ids).argmax())
            ids.append(token)
            new.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
        return new


def generate(pte: str | Path | InferencePTE, tokenizer, prompt: str, n: int) -> str:
    """Greedy ``n``-token continuation of ``prompt`` by an inference .pte (ExecuTorch runtime), decoded."""
    program = pte if isinstance(pte, InferencePTE) else InferencePTE(pte)
    ids = tokenizer(prompt)["input_ids"]
    new = program.generate_ids(ids, n, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True)
