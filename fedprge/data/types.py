"""The data containers shared by every task."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """One client's local examples: ``train`` (what training sees), ``val`` (carved from the training data to choose
    personalization hyper-parameters; never trained on) and ``test`` (held out, only for the reported metrics)."""

    client_id: str
    train: list[Example]
    test: list[Example]
    val: list[Example] = field(default_factory=list)


@dataclass
class FederatedDataset:
    """A task split over clients; ``kind`` is ``"lm"`` or ``"classification"``."""

    task: str
    kind: str
    clients: list[ClientDataset]
