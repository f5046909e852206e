"""Local JSON-lines datasets.

Each line is ``{"text": ...}`` (language modelling) or ``{"prompt": ..., "target": ..., "choices": [...]}``
(classification; ``target`` must be one of ``choices``). An optional ``"client"`` field gives the natural
partition. The kind is inferred from the first record: classification if it has ``"choices"``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fedprge.data.types import Example


@lru_cache(maxsize=8)
def _parse(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[Example, ...], tuple[str | None, ...]]:
    kind: str | None = None
    examples: list[Example] = []
    owners: list[str | None] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
            kind = kind or ("classification" if "choices" in rec else "lm")
            examples.append(_example(rec, kind, where))
            client = rec.get("client")
            owners.append(None if client is None else str(client))
    if kind is None:
        raise ValueError(f"{path} holds no records")
    return kind, tuple(examples), tuple(owners)


def _example(rec: dict, kind: str, where: str) -> Example:
    if kind == "lm":
        if not isinstance(rec.get("text"), str) or not rec["text"]:
            raise ValueError(f'{where}: an LM record needs a non-empty string "text" field, got keys {sorted(rec)}')
        return Example("", rec["text"])
    prompt, target, choices = rec.get("prompt"), rec.get("target"), rec.get("choices")
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise ValueError(f'{where}: a classification record needs string "prompt" and "target" fields')
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f'{where}: "choices" must be a non-empty list of strings, got {choices!r}')
    if target not in choices:
        raise ValueError(f"{where}: target {target!r} is not one of the choices {choices!r}")
    return Example(prompt, target, tuple(choices))


def load_jsonl(path: str | Path) -> tuple[str, tuple[Example, ...], tuple[str | None, ...]]:
    """``(kind, examples, each example's client or None)`` for a JSONL file (cached while unchanged)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"JSONL dataset {str(path)!r} does not exist ({p.absolute()}); a task is 'shakespeare', 'tweets' "
            "or the path of an existing .jsonl file"
        )
    st = p.stat()
    return _parse(str(p.resolve()), st.st_mtime_ns, st.st_size)
