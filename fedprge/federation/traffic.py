"""Exact bytes of the serialized Flower messages a run sends and receives."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from flwr.app import Message
from flwr.serverapp import Grid

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


class Exchange(NamedTuple):
    """One ``send_and_receive``: its messages, their replies and the bytes :class:`Traffic` counted each way."""

    messages: list[Message]
    replies: list[Message]
    down: int
    up: int


class CountingGrid:
    """A Grid that counts every message it carries in a :class:`Traffic` (phase ``train``), as the P-RGE round loop
    does, for code that drives the grid itself (Flower's FedAvg, the SecAgg+ workflow): the bytes of all its
    exchanges in ``down`` / ``up``, and the last exchange for a ``rounds.csv`` row."""

    def __init__(self, grid: Grid, traffic: Traffic) -> None:
        self._grid, self.traffic = grid, traffic
        self.last = Exchange([], [], 0, 0)
        self.down = self.up = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        down = self.traffic.add("train", "down", messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        up = self.traffic.add("train", "up", replies)
        self.down, self.up = self.down + down, self.up + up
        if messages:  # Flower's FedAvg also sends its federated evaluation: no messages here (fraction_evaluate=0)
            self.last = Exchange(messages, replies, down, up)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)
