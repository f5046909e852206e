"""Exact bytes of the serialized Flower messages a run sends and receives."""

from __future__ import annotations

from collections import defaultdict

from flwr.app import Message

from fedprge.federation.protocol import content_bytes, wire_bytes


class Traffic:
    """Exact bytes of the serialized Flower messages, by phase (setup/train/evaluate) and direction."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.payload: dict[str, int] = defaultdict(int)
        self.count: dict[str, int] = defaultdict(int)

    def add(self, phase: str, direction: str, msgs: list[Message]) -> int:
        """Count messages (error replies carry no content and are not counted); returns their wire bytes."""
        total = 0
        for m in msgs:
            if m.has_error():
                continue
            n = wire_bytes(m)
            total += n
            self.bytes[f"{phase}_{direction}"] += n
            self.payload[f"{phase}_{direction}"] += content_bytes(m.content)
            self.count[f"{phase}_{direction}"] += 1
        return total

    def state(self) -> dict[str, dict[str, int]]:
        return {"bytes": dict(self.bytes), "payload": dict(self.payload), "count": dict(self.count)}

    def restore(self, state: dict[str, dict[str, int]]) -> None:
        """Add a checkpoint's counters to this run's (a resumed run has already counted its own registration)."""
        for name in ("bytes", "payload", "count"):
            mine = getattr(self, name)
            for key, value in state[name].items():
                mine[key] += value
