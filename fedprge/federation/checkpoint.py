"""The server's checkpoint: one file in the run folder, rewritten atomically after every round.

``checkpoint.pt`` (``torch.save``, read back with ``weights_only=True``) holds the resolved config, the last
finished round, the strategy state (global B, pool coefficients, the per-round seed/coefficient history that
seed catch-up replays, the clients' aggregation weights), the rounds rows and evaluations written so far and the
traffic counters. No RNG state is needed: client sampling, seeds and faults are functions of the run seed and
the round. Synced rounds are not kept: after a resume every node starts unsynced (its per-node state is gone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fedprge.config import RunConfig, to_yaml

NAME = "checkpoint.pt"
VERSION = 1
# keys a resumed run may change: they do not touch the result
RESUMABLE = ("name", "out_dir", "sim.", "federation.stop_after", "federation.checkpoint", "federation.setup_timeout_s")


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"version": VERSION, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; FileNotFoundError / ValueError say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run saved no round, so there is nothing to resume")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} fedprge checkpoint")
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_compatible(saved_yaml: str, cfg: RunConfig) -> None:
    """Raise ValueError naming every key whose value differs from the checkpointed run (except RESUMABLE ones)."""
    old = _flat(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    new = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)
    ]
    if diff:
        raise ValueError(
            "the resumed run's config differs from the checkpointed one in keys that change the result: "
            + "; ".join(diff)
            + f" (only {', '.join(RESUMABLE)} may change)"
        )
