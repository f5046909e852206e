"""A trained B as a standard PEFT LoRA adapter (and a merged model), written through peft's own API.

LoRA-FA is LoRA with A frozen: fedprge's layer computes ``W x + (alpha / r) B (A x)`` with A (r x in) drawn
from ``lora.a_seed`` and B (out x r) the slice of the flat B vector for that module (module order, row-major).
peft's ``lora.Linear`` computes ``W x + (lora_alpha / r) lora_B(lora_A(x))``, so with ``r = rank``,
``lora_alpha = alpha``, ``lora_A.weight = A`` and ``lora_B.weight = B`` the two are the same function.

Output of :func:`export_run` (``RUN`` is the run folder): ``RUN/adapters/global/`` (``adapter_config.json``,
``adapter_model.safetensors``, ``README.md``), ``RUN/adapters/client-<partition>/`` for each personal B the run
kept, and with ``merged`` ``RUN/adapters/global-merged/`` (the merged model, its tokenizer and, with ``pte``,
``model.pte``: an ExecuTorch next-token program, see :mod:`fedprge.export.inference`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedprge.config import RunConfig
from fedprge.engine.adapters import LoRAConfig, LoRAFA
from fedprge.export.model_card import adapter_card, merged_card
from fedprge.export.run_folder import RunState, load_run

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoRAModule:
    """One LoRA-FA target: its module name, frozen A (r x in) and the (start, out, r) of its B in the flat vector."""

    name: str
    A: torch.Tensor
    start: int
    out_features: int
    rank: int

    @property
    def size(self) -> int:
        return self.out_features * self.rank


def lora_layout(model: nn.Module, lora: LoRAConfig) -> list[LoRAModule]:
    """fedprge's adapter layout on ``model`` (target names, A, B offsets); ``model`` is left as it was.

    The layout is read from :class:`~fedprge.engine.adapters.LoRAFA` itself (the layers are attached, read and
    detached again), so the A matrices and the B order are exactly the ones training used.
    """
    adapters = LoRAFA(model, lora)
    layout, start = [], 0
    for name, layer, (out, r) in zip(adapters.names, adapters.layers, adapters.shapes, strict=True):
        layout.append(LoRAModule(name, layer.A.detach().to(torch.float32).clone(), start, out, r))
        start += out * r
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base)
    return layout


def check_b(b: torch.Tensor, layout: list[LoRAModule], cfg: RunConfig) -> None:
    """ValueError unless ``b`` has exactly the number of entries of the base model's LoRA layout."""
    want = sum(m.size for m in layout)
    if b.dim() != 1 or b.numel() != want:
        shapes = sorted({(m.name.rsplit(".", 1)[-1], m.out_features, m.rank) for m in layout})
        raise ValueError(
            f"B has {b.numel()} entries but model.name={cfg.model.name!r} with lora rank {cfg.lora.rank} on "
            f"{list(cfg.lora.target_modules)} needs {want} ({len(layout)} modules, (name, out, r) = {shapes}); "
            "the adapter does not belong to this base model"
        )


def base_model_ref(cfg: RunConfig) -> str:
    """What ``adapter_config.json`` names as the base model: a local folder, or how to rebuild the tiny model."""
    from fedprge.models import smollm2_dir

    if cfg.model.name == "tiny":
        return f"fedprge:tiny(seed={cfg.seed})"
    if cfg.model.name == "smollm2":
        return str(smollm2_dir())
    return str(Path(cfg.model.name).expanduser().resolve())


def load_base(cfg: RunConfig):
    """The run's base model in float32 and its tokenizer (offline; see :func:`fedprge.models.load_model`)."""
    from fedprge.models import load_model

    return load_model(cfg.model.name, dtype=torch.float32, seed=cfg.seed)


def peft_model(cfg: RunConfig, b: torch.Tensor, model: nn.Module | None = None):
    """``(PeftModel, layout)``: ``model`` (default: the run's base) with peft LoRA set to A and ``b``.

    Built with ``LoraConfig`` + ``get_peft_model``; refuses a B whose size does not fit the base model, and a
    peft target set that differs from fedprge's.
    """
    from peft import LoraConfig, get_peft_model

    if model is None:
        model, _ = load_base(cfg)
    lora = cfg.lora_config()
    layout = lora_layout(model, lora)
    check_b(b, layout, cfg)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.name_or_path = base_model_ref(cfg)  # peft records it as adapter_config.json's base_model_name_or_path
    with warnings.catch_warnings():  # peft 0.21 calls a transformers API that transformers 5 marks deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and ADAPTER_NAME in getattr(m, "lora_A", {})
    }
    if wrapped != {m.name for m in layout}:
        raise ValueError(
            f"peft's LoRA targets {sorted(wrapped)} differ from fedprge's {[m.name for m in layout]} for "
            f"target_modules={list(lora.target_modules)}"
        )
    scalings = {model.base_model.model.get_submodule(m.name).scaling[ADAPTER_NAME] for m in layout}
    if scalings != {lora.scale}:
        raise ValueError(f"peft's LoRA scaling {sorted(scalings)} differs from fedprge's alpha / r = {lora.scale}")
    set_b(model, layout, b)
    model.eval()
    return model, layout


@torch.no_grad()
def set_b(model: nn.Module, layout: list[LoRAModule], b: torch.Tensor) -> None:
    """Write A and the per-module B slices of the flat ``b`` into a PeftModel's lora_A / lora_B weights."""
    inner = model.base_model.model
    for m in layout:
        layer = inner.get_submodule(m.name)
        layer.lora_A[ADAPTER_NAME].weight.copy_(m.A)
        layer.lora_B[ADAPTER_NAME].weight.copy_(b[m.start : m.start + m.size].reshape(m.out_features, m.rank))


@dataclass
class ExportResult:
    """The folders and files :func:`export_run` wrote."""

    adapters: dict[str, Path] = field(default_factory=dict)  # "global", "client-<p>" -> folder
    merged: Path | None = None
    pte: Path | None = None


def export_run(
    run: str | Path | RunState,
    out: str | Path | None = None,
    *,
    merged: bool = False,
    pte: bool = False,
    personal: Mapping[int, torch.Tensor] | None = None,
    backend: str = "xnnpack",
    max_len: int = 128,
) -> ExportResult:
    """Write the run's adapters (global, and one per personal B) under ``out`` (default ``RUN/adapters``).

    ``personal`` adds client states to those the run folder kept; ``merged`` also writes the global adapter
    merged into the base (``merge_and_unload``) with its tokenizer; ``pte`` (implies ``merged``) exports that
    merged model as an ExecuTorch next-token program with ``max_len`` tokens.
    """
    state = run if isinstance(run, RunState) else load_run(run)
    if pte:
        import importlib.util

        from fedprge.export.inference import check_max_len

        if importlib.util.find_spec("executorch") is None:
            raise ValueError("pte=True (--pte) needs ExecuTorch: pip install -e '.[executorch]'")
        from fedprge.export.lower import check_backend

        check_backend(backend)
        check_max_len(max_len)
    out = Path(out) if out is not None else state.dir / "adapters"
    states = {"global": state.b}
    clients = {**state.personal, **(personal or {})}
    states.update({f"client-{p}": b for p, b in sorted(clients.items())})
    base, tokenizer = load_base(state.cfg)
    model, layout = peft_model(state.cfg, state.b, base)
    for b in states.values():
        check_b(b, layout, state.cfg)  # every state, before anything is written
    result = ExportResult()
    for tag, b in states.items():
        set_b(model, layout, b)
        folder = out / tag
        model.save_pretrained(str(folder), save_embedding_layers=False)  # LoRA only; and no hub look-up
        partition = None if tag == "global" else int(tag.split("-", 1)[1])
        (folder / "README.md").write_text(adapter_card(state, b, partition))
        result.adapters[tag] = folder
    if merged or pte:
        set_b(model, layout, state.b)
        result.merged = out / "global-merged"
        full = model.merge_and_unload()
        full.config.use_cache = True  # the merged model is for generation
        full.save_pretrained(str(result.merged))
        tokenizer.save_pretrained(str(result.merged))
        if pte:
            from fedprge.export.inference import export_inference_pte

            result.pte = export_inference_pte(full, tokenizer, result.merged / "model.pte", max_len, backend)
        (result.merged / "README.md").write_text(merged_card(state, result.pte))
    return result
