"""The data containers shared by every task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training example: ``prompt`` carries no loss, ``target`` does.

    Plain LM text has ``prompt == ""``. For classification ``target`` is one of ``choices`` (the label words,
    e.g. ``" positive"``).
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()


@dataclass
class ClientDataset:
    """One client's local train and test examples."""

    client_id: str
    train: list[Example]
    test: list[Example]


@dataclass
class FederatedDataset:
    """A task split over clients; ``kind`` is ``"lm"`` or ``"classification"``."""

    task: str
    kind: str
    clients: list[ClientDataset]
