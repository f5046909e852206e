"""The machine-learning side of a client: its data, the backend, local P-RGE training and evaluation.

Flower's ClientApp is stateless and re-created per message; :func:`load_task` caches one ``Task`` per process
(one model per Ray worker, shared by all the virtual clients that worker runs).

Two backends (config ``client.backend``): ``eager`` runs the PyTorch model; ``executorch`` runs an exported .pte
with ExecuTorch's runtime (:mod:`fedprge.export.backend`) and loads only a tokenizer, never a model. A SuperNode
picks its own with its node config: ``pte='/path/p.pte'`` makes it an ExecuTorch client, ``backend='eager'``
or ``backend='executorch'`` selects explicitly (:func:`client_overrides`).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedprge.config import ClientSection, RunConfig, from_yaml
from fedprge.config_rules import validate
from fedprge.data import ClientDataset, FederatedDataset, encode, load_federated, sample_indices
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAFA
from fedprge.engine.backend import Backend, EagerBackend, backend_step, check_device
from fedprge.engine.estimator import StepRecord, ZOConfig
from fedprge.engine.seeds import BATCH, DITTO, PERSONAL, private_seeds, step_seeds
from fedprge.engine.shared_base import resolve_precision
from fedprge.evaluate import Scores, choice_scores, evaluate, score
from fedprge.privacy import StepPrivatizer, step_rule


def checkpoints(steps: int) -> list[int]:
    """Step counts at which personalization compares validation losses: 0, 1, 2, 4, ... and ``steps`` itself."""
    out, k = [0], 1
    while k < steps:
        out.append(k)
        k *= 2
    return [*out, steps] if steps > 0 else out


@dataclass
class TrainResult:
    b: torch.Tensor
    projected_grads: np.ndarray  # (local_steps, q) float32
    loss: float  # mean of the 2q perturbed losses over the steps


class Memo:
    """``compute()`` once per key in this process, the ``size`` most recently used results kept."""

    def __init__(self, size: int) -> None:
        self.size, self._store = size, OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, key: Hashable, compute: Callable[[], object]):
        if key in self._store:
            self._store.move_to_end(key)
        else:
            self._store[key] = compute()
            if len(self._store) > self.size:
                self._store.popitem(last=False)
        return self._store[key]


class Task:
    """Model + adapters + federated data for one run configuration."""

    def __init__(self, cfg: RunConfig, backend: Backend | None = None, tokenizer=None) -> None:
        self.cfg = cfg
        self.zo: ZOConfig = cfg.zo_config()
        self.spec = cfg.seed_spec()
        if backend is None:
            backend, tokenizer = make_backend(cfg)
        self.backend = backend
        self.tokenizer = tokenizer
        self.data: FederatedDataset = load_data(cfg)
        self._metrics = Memo(1024)  # see :meth:`_once`
        self._states = Memo(64)  # see :meth:`state_once`; a SmolLM2 B is 737 KB

    def _once(self, key: tuple, compute: Callable[[], object]) -> object:
        """``compute()`` for ``key`` once per process: the final evaluation asks for the same (B, split) more than once
        (the 0-step candidate of ``finetune`` is the global B; a client that never trained has it as ``personal``),
        and a forward pass is the one thing a CPU evaluation pays for. Exact: the same inputs, the same numbers."""
        return self._metrics(key, compute)

    def state_once(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, a B that is a deterministic function of ``key``, once per process: the clients a worker runs
        that last synced at the same round replay the same round updates from the same B, and one replay serves
        them all, bit for bit. A device replays for itself; the directions it regenerates are counted in
        ``rounds.csv`` (``replay_directions``)."""
        return self._states(key, compute).clone()

    @property
    def num_params(self) -> int:
        return self.backend.num_params

    def client(self, partition: int) -> ClientDataset:
        if not 0 <= partition < len(self.data.clients):
            raise ValueError(f"partition {partition} does not exist; this run has {len(self.data.clients)} clients")
        return self.data.clients[partition]

    def batch(self, partition: int, *key: int) -> dict[str, torch.Tensor]:
        train = self.client(partition).train
        idx = sample_indices(len(train), self.cfg.federation.batch_size, rng.derive_seed(self.cfg.seed, *key))
        return encode(self.tokenizer, [train[i] for i in idx], self.cfg.data.max_len)

    def train_batch(self, partition: int, rnd: int, step: int) -> dict[str, torch.Tensor]:
        """The minibatch of local step ``step`` in round ``rnd``: the same for every training method."""
        return self.batch(partition, BATCH, rnd, partition, step)

    def train(self, b: torch.Tensor, partition: int, rnd: int) -> TrainResult:
        """``local_steps`` P-RGE steps from ``b`` on this client's data; seeds from :func:`step_seeds`."""
        steps, losses, grads = self.cfg.federation.local_steps, [], []
        for step in range(steps):
            batch = self.train_batch(partition, rnd, step)
            rule = step_rule(self.cfg, rnd, partition, step)  # DP-ZO clip and noise (None: privacy off)
            b, rec, loss = self.step(b, step_seeds(self.spec, rnd, partition, step), batch, rule)
            grads.append(rec.projected_grads)
            losses.append(loss)
        return TrainResult(b, np.asarray(grads, dtype=np.float32), float(np.mean(losses)))

    def local_steps(
        self, b: torch.Tensor, partition: int, steps: int, tag: int, anchor: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Personalization: ``steps`` P-RGE steps on the client's own data, directions private to the client.
        With ``anchor`` every step also pulls b toward it by ``lr * eval.ditto_lambda * (b - anchor)`` (Ditto's
        proximal term: exact, no forward pass)."""
        return self.adapt(b, partition, steps, tag, anchor, select=False)[0]

    def adapt(
        self,
        b: torch.Tensor,
        partition: int,
        steps: int,
        tag: int,
        anchor: torch.Tensor | None = None,
        select: bool = True,
        trail: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """:meth:`local_steps`, keeping the state after the step count of :func:`checkpoints` with the lowest loss
        on the client's validation split (``select``; without a validation split: all ``steps``). ``trail``, when
        given, receives the state at every checkpoint (for studies of the gain against the step budget)."""
        select = select and bool(self.client(partition).val)
        best, best_k, best_loss = b, 0, self.validation_loss(b, partition) if select else math.inf
        marks = set(checkpoints(steps))
        if trail is not None:
            trail[0] = b
        for step in range(steps):
            batch = self.batch(partition, PERSONAL, tag, partition, step)
            seeds = private_seeds(self.cfg.seed, PERSONAL, tag, partition, step, self.zo.q)
            b, _, _ = self.step(b, seeds, batch)
            if anchor is not None:
                b = self.prox(b, anchor)
            if trail is not None and step + 1 in marks:
                trail[step + 1] = b
            if select and step + 1 in marks and (loss := self.validation_loss(b, partition)) < best_loss:
                best, best_k, best_loss = b, step + 1, loss
        return (best, best_k) if select else (b, steps)

    def prox(self, b: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Ditto's proximal step toward ``anchor``: the exact gradient of (lambda/2) ||b - anchor||^2."""
        return b - (self.zo.lr * self.cfg.eval.ditto_lambda) * (b - anchor)

    def ditto(self, personal: torch.Tensor, b_global: torch.Tensor, partition: int, rnd: int) -> torch.Tensor:
        """Ditto's personal update in training round ``rnd``: ``local_steps`` P-RGE steps on the round's batches
        with private directions, each followed by the pull toward the round's global B. Never sent."""
        for step in range(self.cfg.federation.local_steps):
            seeds = private_seeds(self.cfg.seed, DITTO, rnd, partition, step, self.zo.q)
            personal, _, _ = self.step(personal, seeds, self.train_batch(partition, rnd, step))
            personal = self.prox(personal, b_global)
        return personal

    def scores(self, b: torch.Tensor, partition: int, split: str) -> Scores:
        """:func:`~fedprge.evaluate.score` of ``b`` on the client's ``val`` or ``test`` split, once per process: the
        loss of every method, and a token prior's rescoring, come from it."""
        c = self.client(partition)
        examples = {"val": c.val, "test": c.test}[split]
        return self._once(
            ("scores", split, partition, digest(b)),
            lambda: score(self.backend, self.tokenizer, b, examples, self.cfg.data.max_len),
        )

    def validation_loss(self, b: torch.Tensor, partition: int) -> float:
        """Mean target-token NLL of ``b`` on the client's validation split (what personalization selects on)."""
        s = self.scores(b, partition, "val")
        return s.total / max(s.count, 1)

    def step(
        self, b: torch.Tensor, seeds: list[int], batch: dict[str, torch.Tensor], privatize: StepPrivatizer | None = None
    ) -> tuple[torch.Tensor, StepRecord, float]:
        """One P-RGE step on ``batch`` (:func:`~fedprge.engine.backend.backend_step`, the same on every backend):
        ``(new b, StepRecord, mean of the 2q perturbed losses)``; ``privatize``: the DP-ZO rule of a sent step."""
        new_b, rec, losses = backend_step(self.backend, b, batch, seeds, self.zo, privatize)
        return new_b, rec, float(losses.mean())

    def evaluate(
        self,
        b: torch.Tensor,
        partition: int,
        label_bias: list[float] | None = None,
        token_prior: tuple[torch.Tensor, float] | None = None,
    ) -> dict[str, float]:
        """Held-out metrics of ``b`` on the client's test split (with a personal output prior, if given)."""
        test, max_len = self.client(partition).test, self.cfg.data.max_len
        bias = tuple(label_bias) if label_bias is not None and any(label_bias) else None
        prior = (digest(token_prior[0]), token_prior[1]) if token_prior is not None and token_prior[1] > 0 else None
        return dict(
            self._once(
                ("test", partition, digest(b), bias, prior),
                lambda: evaluate(
                    self.backend,
                    self.tokenizer,
                    b,
                    test,
                    max_len,
                    label_bias=bias,
                    token_prior=token_prior,
                    scores=self.scores(b, partition, "test"),
                ),
            )
        )

    def choice_scores(self, b: torch.Tensor, examples: list) -> torch.Tensor:
        """(examples, choices) mean NLL of each label word: what a classification decision compares."""
        return choice_scores(self.backend, self.tokenizer, b, examples, self.cfg.data.max_len)


def digest(t: torch.Tensor) -> bytes:
    """A fingerprint of a tensor's values (dtype, shape and bytes)."""
    data = t.detach().cpu().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.blake2b(head + data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def load_data(cfg: RunConfig) -> FederatedDataset:
    d = cfg.data
    return load_federated(
        d.task,
        cfg.federation.clients,
        d.partition,
        alpha=d.alpha,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        max_train_per_client=d.max_train_per_client,
        max_test_per_client=d.max_test_per_client,
        chunk_words=d.chunk_words,
        val_fraction=d.val_fraction,
        max_val_per_client=d.max_val_per_client,
    )


def make_backend(cfg: RunConfig) -> tuple[Backend, object]:
    """``(backend, tokenizer)`` of ``cfg.client.backend``; the executorch path loads no model (and no peft)."""
    if cfg.client.backend == "executorch":
        from fedprge.export.backend import load_pte_backend
        from fedprge.models import load_tokenizer

        return load_pte_backend(cfg, num_threads=max(1, cfg.sim.cpus_per_client)), load_tokenizer(cfg.model.name)
    from fedprge.models import load_model

    device = cfg.model.device
    check_device(device)
    model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype), seed=cfg.seed)
    precision = resolve_precision(cfg.model.precision, device) if cfg.model.dtype == "float32" else "float32"
    lora = LoRAFA(model, cfg.lora_config())
    return EagerBackend(model, lora, precision=precision, device=device), tokenizer


def client_overrides(node_config: dict) -> tuple[str | None, str | None]:
    """``(backend, pte)`` a SuperNode's node config sets: ``pte`` alone implies ``backend='executorch'``."""
    backend, pte = node_config.get("backend"), node_config.get("pte")
    if pte is not None and backend is None:
        backend = "executorch"
    return (None if backend is None else str(backend)), (None if pte is None else str(pte))


@lru_cache(maxsize=2)
def load_task(config_yaml: str, backend: str | None = None, pte: str | None = None) -> Task:
    """The process-wide Task for a run (keyed by its resolved YAML), with a node's backend/pte overrides."""
    cfg = from_yaml(config_yaml)
    if backend is not None or pte is not None:
        backend = backend or cfg.client.backend
        cfg.client = ClientSection(backend, (pte or cfg.client.pte) if backend == "executorch" else None)
        try:
            validate(cfg)
        except ValueError as e:
            raise ValueError(f"this SuperNode's node config (backend={backend!r}, pte={pte!r}): {e}") from None
    torch.set_num_threads(max(1, cfg.sim.cpus_per_client))
    return Task(cfg)
