"""A bad model, data set or LoRA target stops ``python -m fedprge.simulate`` with one line, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "value", "allowed"),
    [
        (["--model", "/no/such/path"], "'/no/such/path'", '"smollm2"'),
        (["--model", "smollm3"], "'smollm3'", '"tiny"'),  # neither a known name nor a folder
        (["--task", "missing.jsonl"], "'missing.jsonl'", "existing .jsonl file"),
        (["lora.target_modules=[nope]"], "'nope'", "'q_proj'"),
        (["model.device=cuda"], "'cuda'", "sim.gpus_per_client"),  # a GPU client without a GPU share
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, args, value, allowed):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "fedprge.simulate", "--config", str(REPO / "configs" / "smoke.yaml")]
    start = time.monotonic()
    done = subprocess.run(
        [*cmd, "--out", str(out), "--no-progress", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    seconds = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m fedprge.simulate: error: ")
    assert value in lines[0] and allowed in lines[0]
    assert done.stdout == ""  # no Flower, Ray or fedprge log line: nothing started
    assert not out.exists()  # not even the results folder
    assert seconds < 180  # imports only (torch, transformers): 3-20 s idle, 69 s seen beside a SmolLM2 study
