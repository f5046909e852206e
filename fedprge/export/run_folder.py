"""What an export reads from a run folder: the resolved config, the trained B and the results summary.

A finished run has ``global_b.pt``; an unfinished one (killed, or stopped with ``federation.stop_after``) has
only ``checkpoint.pt``, whose B is the global state after its last finished round. Personal states, when a run
kept them, are flat B vectors under ``personal/client-<partition>.pt`` (:func:`save_personal_b`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedprge.config import RunConfig, from_yaml

CONFIG, GLOBAL_B, CHECKPOINT, SUMMARY = "config.yaml", "global_b.pt", "checkpoint.pt", "summary.json"
PERSONAL = "personal"  # folder of the personal B vectors, client-<partition>.pt
_PERSONAL_FILE = re.compile(r"client-(\d+)\.pt")
_ALLOWED = f"a run folder written by python -m fedprge.simulate (with {CONFIG} and {GLOBAL_B} or {CHECKPOINT})"


@dataclass
class RunState:
    """A run's config, its global B (flat float32), how many rounds it finished, and where B came from."""

    dir: Path
    cfg: RunConfig
    config_text: str
    b: torch.Tensor
    rounds: int
    source: str  # GLOBAL_B or CHECKPOINT
    summary: dict[str, Any] | None = None
    personal: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.source == GLOBAL_B

    @property
    def config_sha256(self) -> str:
        return hashlib.sha256(self.config_text.encode()).hexdigest()


def _flat_b(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what} holds {shape}, not a flat floating-point B vector")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds non-finite values; an adapter needs a finite B")
    return value.detach().to(torch.float32).contiguous()


def _load_tensor_file(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise ValueError(f"{str(path)!r} is not a readable torch file: {str(e).splitlines()[0]}") from None


def personal_b_path(run_dir: str | Path, partition: int) -> Path:
    return Path(run_dir) / PERSONAL / f"client-{int(partition)}.pt"


def save_personal_b(run_dir: str | Path, partition: int, b: torch.Tensor) -> Path:
    """Keep client ``partition``'s personal B (flat float32) in the run folder, atomically; returns the path."""
    path = personal_b_path(run_dir, partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(b.detach().to(torch.float32).cpu().contiguous(), tmp)
    os.replace(tmp, path)
    return path


def load_personal(run_dir: str | Path) -> dict[int, torch.Tensor]:
    """Every ``personal/client-<partition>.pt`` of the run folder, by partition (empty if none)."""
    folder = Path(run_dir) / PERSONAL
    found = {}
    for path in sorted(folder.glob("client-*.pt")) if folder.is_dir() else []:
        m = _PERSONAL_FILE.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = _flat_b(_load_tensor_file(path), str(path))
    return dict(sorted(found.items()))


def load_run(path: str | Path) -> RunState:
    """Read a run folder (or its ``checkpoint.pt``); ValueError names the path and what is expected."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"run folder {str(path)!r} does not exist; expected {_ALLOWED}")
    if path.is_file():
        if path.name != CHECKPOINT:
            raise ValueError(f"{str(path)!r} is a file, not a run folder; expected {_ALLOWED}, or its {CHECKPOINT}")
        return _from_checkpoint(path.parent, path)
    if (path / GLOBAL_B).is_file():
        if not (path / CONFIG).is_file():
            raise ValueError(f"run folder {str(path)!r} has {GLOBAL_B} but no {CONFIG}; expected {_ALLOWED}")
        text = (path / CONFIG).read_text()
        summary = json.loads((path / SUMMARY).read_text()) if (path / SUMMARY).is_file() else None
        rounds = int(summary["rounds"]) if summary and "rounds" in summary else _parse(text, path).federation.rounds
        b = _flat_b(_load_tensor_file(path / GLOBAL_B), str(path / GLOBAL_B))
        return RunState(path, _parse(text, path), text, b, rounds, GLOBAL_B, summary, load_personal(path))
    if (path / CHECKPOINT).is_file():
        return _from_checkpoint(path, path / CHECKPOINT)
    raise ValueError(
        f"run folder {str(path)!r} has no finished round (neither {GLOBAL_B} nor {CHECKPOINT}); expected {_ALLOWED}"
    )


def _parse(text: str, where: Path) -> RunConfig:
    try:
        return from_yaml(text)
    except Exception as e:  # omegaconf and validation errors alike
        raise ValueError(f"the config of {str(where)!r} is not a valid fedprge config: {e}") from None


def _from_checkpoint(run_dir: Path, path: Path) -> RunState:
    state = _load_tensor_file(path)
    if not isinstance(state, dict) or "strategy" not in state or "round" not in state:
        raise ValueError(f"{str(path)!r} is not a fedprge checkpoint (no strategy state and round)")
    text = (run_dir / CONFIG).read_text() if (run_dir / CONFIG).is_file() else str(state.get("config", ""))
    b = _flat_b(state["strategy"].get("b"), f"the B of {str(path)!r}")
    return RunState(run_dir, _parse(text, path), text, b, int(state["round"]), CHECKPOINT, None, load_personal(run_dir))
