"""One typed configuration for a run: dataclass defaults <- YAML files <- dotlist overrides (omegaconf)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedprge.engine.adapters import LoRAConfig
from fedprge.engine.estimator import ZOConfig

DOWNLINKS = ("weights", "seeds", "pool")
SEED_SCOPES = ("client", "round")
PERSONALIZATION = ("global", "local", "finetune", "personal")


@dataclass
class ModelSection:
    name: str = "smollm2"  # "tiny", "smollm2" or a local Hugging Face model folder
    dtype: str = "float32"


@dataclass
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    a_seed: int = 0


@dataclass
class DataSection:
    task: str = "shakespeare"  # "shakespeare", "tweets" or a .jsonl path
    partition: str = "natural"  # natural | dirichlet | iid
    alpha: float = 0.5  # Dirichlet concentration
    max_len: int = 48
    chunk_words: int = 24
    test_fraction: float = 0.2
    max_train_per_client: int = 64
    max_test_per_client: int = 8


@dataclass
class ZOSection:
    q: int = 4
    eps: float = 1e-2
    lr: float = 3e-2  # the largest that did not diverge on SmolLM2 + Shakespeare (1e-1 did); see README
    distribution: str = "gaussian"


@dataclass
class FederationSection:
    clients: int = 50
    rounds: int = 5
    fraction: float = 0.2  # of clients sampled per round
    min_clients: int = 1  # a round with fewer successful replies is skipped (global B unchanged)
    local_steps: int = 10
    batch_size: int = 1
    downlink: str = "seeds"  # weights | seeds | pool
    seed_scope: str = "client"  # client: own directions per client; round: all clients share the round's
    pool_size: int = 1024  # K for downlink=pool (FedKSeed)
    timeout_s: float = 600.0  # per round; replies after it are dropped
    verify: bool = False  # clients also return their B so the server checks its reconstruction (debug only)


@dataclass
class EvalSection:
    every: int = 1  # evaluate the global B every N rounds on the curve clients (0: only before and after training)
    curve_clients: int = 10  # the first N clients (by partition) give the metric-vs-round curve (0: all)
    personalization: list[str] = field(default_factory=lambda: ["global", "finetune", "local", "personal"])
    personal_steps: int = 2  # P-RGE steps of "finetune" (from the global B) and "local" (from zero B)
    max_clients: int = 0  # evaluate on at most this many clients (0: all)


@dataclass
class SimSection:
    cpus: int = 2  # CPUs Ray may use on this machine
    cpus_per_client: int = 1  # one torch thread per Ray worker: the only stable timing on small machines
    ray_address: str | None = None  # attach to an existing Ray cluster (e.g. "127.0.0.1:6379")


@dataclass
class RunConfig:
    seed: int = 0
    name: str = "run"
    out_dir: str = "runs"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    zo: ZOSection = field(default_factory=ZOSection)
    federation: FederationSection = field(default_factory=FederationSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sim: SimSection = field(default_factory=SimSection)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora.rank, self.lora.alpha, tuple(self.lora.target_modules), self.lora.a_seed)

    def zo_config(self) -> ZOConfig:
        return ZOConfig(self.zo.q, self.zo.eps, self.zo.lr, self.zo.distribution)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid; {allowed}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value a run depends on; errors name the key, the bad value and what is allowed."""
    fed, data, ev, sim = cfg.federation, cfg.data, cfg.eval, cfg.sim
    cfg.lora_config()
    cfg.zo_config()
    _check(cfg.seed >= 0, "seed", cfg.seed, "it must be >= 0")
    _check(
        cfg.model.dtype in ("float32", "bfloat16", "float64"),
        "model.dtype",
        cfg.model.dtype,
        "choose float32, bfloat16 or float64",
    )
    _check(fed.clients >= 1, "federation.clients", fed.clients, "it must be >= 1")
    _check(fed.rounds >= 1, "federation.rounds", fed.rounds, "it must be >= 1")
    _check(0 < fed.fraction <= 1, "federation.fraction", fed.fraction, "it must be in (0, 1]")
    _check(fed.min_clients >= 1, "federation.min_clients", fed.min_clients, "it must be >= 1")
    _check(fed.local_steps >= 1, "federation.local_steps", fed.local_steps, "it must be >= 1")
    _check(fed.batch_size >= 1, "federation.batch_size", fed.batch_size, "it must be >= 1")
    _check(fed.downlink in DOWNLINKS, "federation.downlink", fed.downlink, f"choose one of {DOWNLINKS}")
    _check(fed.seed_scope in SEED_SCOPES, "federation.seed_scope", fed.seed_scope, f"choose one of {SEED_SCOPES}")
    _check(fed.pool_size >= 1, "federation.pool_size", fed.pool_size, "it must be >= 1")
    _check(fed.timeout_s > 0, "federation.timeout_s", fed.timeout_s, "it must be > 0")
    _check(
        data.partition in ("natural", "dirichlet", "iid"),
        "data.partition",
        data.partition,
        "choose natural, dirichlet or iid",
    )
    _check(data.alpha > 0, "data.alpha", data.alpha, "the Dirichlet concentration must be > 0")
    _check(data.max_len >= 4, "data.max_len", data.max_len, "it must be >= 4")
    _check(0 < data.test_fraction < 1, "data.test_fraction", data.test_fraction, "it must be in (0, 1)")
    _check(ev.every >= 0, "eval.every", ev.every, "it must be >= 0")
    _check(ev.curve_clients >= 0, "eval.curve_clients", ev.curve_clients, "it must be >= 0 (0: all clients)")
    bad = [m for m in ev.personalization if m not in PERSONALIZATION]
    _check(not bad, "eval.personalization", bad, f"methods must be among {PERSONALIZATION}")
    _check(ev.personal_steps >= 1, "eval.personal_steps", ev.personal_steps, "it must be >= 1")
    _check(sim.cpus >= 1, "sim.cpus", sim.cpus, "it must be >= 1")
    _check(sim.cpus_per_client >= 1, "sim.cpus_per_client", sim.cpus_per_client, "it must be >= 1")
    return cfg


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> RunConfig:
    """Merge YAML files and ``key=value`` overrides onto the defaults, type-check and validate."""
    merged = OmegaConf.structured(RunConfig)
    try:
        for f in files:
            if not Path(f).exists():
                raise FileNotFoundError(f"config file {str(f)!r} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(f))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ValueError(f"bad configuration: {e.msg.splitlines()[0]} (full key: {e.full_key})") from None
    return validate(OmegaConf.to_object(merged))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> RunConfig:
    return validate(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))))
