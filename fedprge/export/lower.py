"""Export a :class:`~fedprge.export.program.PRGEProgram` to an ExecuTorch .pte, plus a sidecar JSON spec.

torch.export.export -> executorch.exir.to_edge_transform_and_lower (XnnpackPartitioner, or no delegate for
``portable``) -> to_executorch. The .pte holds three methods: ``forward`` (the 2q losses), ``directions`` (the
in-program z) and ``nll`` (per-example NLL of one state, for held-out evaluation on the device).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.engine.estimator import ZOConfig
from fedprge.export.program import NLLProgram, PRGEProgram

BACKENDS = ("xnnpack", "portable")
METHODS = ("forward", "directions", "nll")


def non_core_ops() -> list[torch._ops.OpOverload]:
    """Ops of :mod:`fedprge.engine.rng` outside Core ATen (integer shifts); ExecuTorch's portable kernels have them."""
    return [torch.ops.aten.bitwise_right_shift.Tensor_Scalar, torch.ops.aten.bitwise_left_shift.Tensor_Scalar]


@dataclass(frozen=True)
class ProgramSpec:
    """What a .pte was exported with; written next to it as JSON (``spec_path``)."""

    model: str
    num_params: int
    q: int
    eps: float
    batch_size: int
    seq_len: int
    distribution: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    a_seed: int
    backend: str
    pad_token_id: int
    vocab_size: int
    model_seed: int = 0

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, tuple(self.target_modules), self.a_seed)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ProgramSpec:
        data = json.loads(Path(path).read_text())
        data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


def spec_path(pte: str | Path) -> Path:
    """The sidecar JSON of a .pte: same folder and stem, suffix ``.json``."""
    return Path(pte).with_suffix(".json")


def example_inputs(q: int, num_params: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the exported shapes: (input_ids, attention_mask, labels, seeds, b)."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.int64)
    return ids, torch.ones_like(ids), ids.clone(), torch.arange(q, dtype=torch.int64), torch.zeros(num_params)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {BACKENDS}")


def check_shapes(batch_size: int, seq_len: int) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= {low}")


def lower(program: PRGEProgram, batch_size: int, seq_len: int, backend: str = "xnnpack") -> bytes:
    """The .pte bytes of ``program`` with static shapes (batch_size, seq_len)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    check_backend(backend)
    check_shapes(batch_size, seq_len)
    inputs = example_inputs(program.q, program.num_params, batch_size, seq_len)
    with torch.no_grad():
        programs = {
            "forward": torch.export.export(program, inputs),
            "directions": torch.export.export(program.directions, (inputs[3],)),
            "nll": torch.export.export(NLLProgram(program.model, program.lora), (*inputs[:3], inputs[4])),
        }
    partitioner = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]
    config = EdgeCompileConfig(_core_aten_ops_exception_list=non_core_ops())
    edge = to_edge_transform_and_lower(programs, partitioner=partitioner, compile_config=config)
    return edge.to_executorch().buffer


def export_pte(
    out: str | Path,
    model_name: str = "tiny",
    *,
    q: int = 4,
    eps: float = 1e-2,
    batch_size: int = 1,
    seq_len: int = 48,
    backend: str = "xnnpack",
    lora: LoRAConfig = LoRAConfig(),  # noqa: B008 (frozen dataclass)
    distribution: str = "gaussian",
    model_seed: int = 0,
) -> tuple[Path, ProgramSpec, float]:
    """Build the model with adapters, export and write ``out`` (.pte) and its spec; returns (path, spec, seconds)."""
    from fedprge.models import load_model

    check_backend(backend)
    check_shapes(batch_size, seq_len)
    ZOConfig(q=q, eps=eps, distribution=distribution)  # validates q, eps and distribution before the model loads
    out = Path(out)
    model, tokenizer = load_model(model_name, seed=model_seed)
    adapters = LoRAFA(model, lora)
    program = PRGEProgram(model, adapters, q, eps, distribution)
    start = time.perf_counter()
    data = lower(program, batch_size, seq_len, backend)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    spec = ProgramSpec(
        model=model_name,
        num_params=adapters.num_params,
        q=q,
        eps=float(eps),
        batch_size=batch_size,
        seq_len=seq_len,
        distribution=distribution,
        rank=lora.rank,
        alpha=float(lora.alpha),
        target_modules=tuple(lora.target_modules),
        a_seed=lora.a_seed,
        backend=backend,
        pad_token_id=int(tokenizer.pad_token_id),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        model_seed=model_seed,
    )
    spec.save(spec_path(out))
    return out, spec, seconds
