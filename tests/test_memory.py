"""A P-RGE step needs the memory of inference, not of backprop (peak RSS of separate processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "prge_step.py"


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """A 16-layer random Llama: deep enough that stored activations (backprop) outweigh the LM head."""
    from fedprge.models import load_tokenizer, tiny_llama

    tok = load_tokenizer("tiny")
    path = tmp_path_factory.mktemp("deep")
    tiny_llama(tok, hidden_size=128, intermediate_size=512, num_layers=16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def step_memory(method: str, model: Path) -> float:
    """MiB a step adds to the peak RSS over the loaded model, measured in a fresh process."""
    cmd = [sys.executable, str(BENCH), "--method", method, "--model", str(model), "--q", "4", "--bs", "4"]
    cmd += ["--seq", "64", "--steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # RSS tracks live tensors
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["step_extra_mib"]


def test_prge_step_memory_is_that_of_inference_not_backprop(deep_model):
    prge = step_memory("prge", deep_model)
    inference = step_memory("inference_2q", deep_model)  # the same 2q*bs rows, one forward, no update
    backprop = step_memory("backprop", deep_model)  # the bs rows once, activations kept for backward
    assert prge <= 1.1 * inference + 8, (prge, inference)
    assert prge < 0.6 * backprop, (prge, backprop)
