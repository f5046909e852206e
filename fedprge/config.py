"""One typed configuration for a run: dataclass defaults <- YAML files <- dotlist overrides (omegaconf)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedprge.engine.adapters import LoRAConfig
from fedprge.engine.estimator import ZOConfig
from fedprge.engine.shared_base import PRECISION_CHOICES

DOWNLINKS = ("weights", "seeds", "pool")
ALGORITHMS = ("prge", "fedavg_lora_fa", "fedavg_lora", "fedavg_full")
SEED_SCOPES = ("client", "round")
PERSONALIZATION = ("global", "local", "finetune", "personal", "ditto", "mix", "prior")
CLIENT_BACKENDS = ("eager", "executorch")
AGGREGATIONS = ("mean", "trimmed_mean", "median")
CATCHUPS = ("auto", "seeds")
POISON_KINDS = ("nan", "inf", "huge", "wrong_count", "scaled", "count")


@dataclass
class ModelSection:
    name: str = "smollm2"  # "tiny", "smollm2" or a local Hugging Face model folder
    dtype: str = "float32"
    # auto | float32 | shared-bf16: a P-RGE forward's frozen matmuls in bf16 as replica 0 + differences (~3x faster
    # on CPUs with bf16 units, projected gradients a few % off fp32; README "Performance"); auto: shared-bf16 where
    # the machine running the client has bf16 units (CUDA, AVX-512 BF16, AMX), float32 elsewhere; evaluation: fp32
    precision: str = "auto"


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
    # the tail of each client's training examples held out to choose personalization hyper-parameters (never
    # trained on, never the test split); carved before max_train_per_client applies
    val_fraction: float = 0.2
    max_val_per_client: int = 8


@dataclass
class ZOSection:
    q: int = 4
    eps: float = 1e-2
    lr: float = 3e-2  # the largest that did not diverge on SmolLM2 + Shakespeare (1e-1 did); see README
    clip: float = 2.0  # step rule: a step's projected gradients are scaled to RMS <= clip (0: off); estimator.py
    distribution: str = "gaussian"


@dataclass
class FederationSection:
    algorithm: str = "prge"  # or a first-order FedAvg baseline: fedavg_lora_fa | fedavg_lora | fedavg_full
    fo_lr: float = 1e-3  # Adam learning rate of the FedAvg baselines' local steps
    clients: int = 50
    rounds: int = 5
    fraction: float = 0.2  # of clients sampled per round
    min_clients: int = 1  # a round with fewer successful replies is skipped (global B unchanged)
    min_nodes: int = 0  # start with this many connected nodes after node_wait_s (0: wait for all `clients`)
    node_wait_s: float = 0.0  # how long to wait for all `clients` nodes before settling for min_nodes (0: timeout_s)
    local_steps: int = 10
    batch_size: int = 1
    downlink: str = "seeds"  # weights | seeds | pool
    seed_scope: str = "client"  # client: own directions per client; round: all clients share the round's
    pool_size: int = 1024  # K for downlink=pool (FedKSeed)
    timeout_s: float = 600.0  # per round; replies after it are dropped
    verify: bool = False  # clients also return their B so the server checks its reconstruction (debug only)
    # reliability and defences (fedprge/federation/strategy.py documents each rule)
    setup_timeout_s: float = 600.0  # deadline of registration (model loading included)
    catchup: str = "auto"  # seeds downlink: auto (per client, the cheaper of its missed seed lists and B) | seeds
    catchup_max_seeds: int = 0  # auto: also send B when a client would replay more seeds than this (0: no limit)
    aggregation: str = "mean"  # mean | trimmed_mean | median (see strategy.py for seed_scope=client)
    trim_fraction: float = 0.2  # trimmed_mean: share of clients cut at each end
    norm_bound: float = 3.0  # clip a client's projected gradients to this x the round's median norm (0: off)
    max_abs_grad: float = 1e6  # reject a reply with any |projected gradient| above this (0: off)
    max_count_ratio: float = 3.0  # aggregation weight: example count capped at this x the median registered count
    checkpoint: bool = True  # save the server state after every round (resume with --resume RUN_DIR)
    stop_after: int = 0  # debug: stop the server after this many rounds, as if killed (0: never)


@dataclass
class FaultsSection:
    """Injected faults, for robustness studies; each is a function of the run seed, round and partition."""

    drop_rate: float = 0.0  # chance that a sampled client drops out of a round (it sends an error reply)
    straggler_rate: float = 0.0  # chance that a sampled client answers only after federation.timeout_s
    straggler_delay_s: float = 1.0  # how long after the deadline a straggler answers
    poison_fraction: float = 0.0  # share of clients (a fixed set, rounded up) that send poisoned updates
    poison_kind: str = "scaled"  # nan | inf | huge | wrong_count | scaled | count (see federation/faults.py)
    poison_scale: float = -100.0  # "scaled": factor applied to the projected gradients
    eval_straggler_rate: float = 0.0  # share of clients (a fixed set) whose evaluation replies come eval_delay_s late
    eval_delay_s: float = 0.0  # how long such a client sleeps before every evaluation reply
    eval_drop_rate: float = 0.0  # share of clients (a fixed set) whose first evaluation attempts fail (error reply)
    eval_drop_attempts: int = 1  # how many attempts of every evaluation fail for such a client


@dataclass
class EvalSection:
    every: int = 1  # evaluate the global B every N rounds on the curve clients (0: only before and after training)
    curve_clients: int = 10  # the first N clients (by partition) give the metric-vs-round curve (0: all)
    personalization: list[str] = field(default_factory=lambda: ["global", "finetune", "local", "personal"])
    # local P-RGE step budget of "finetune" (from the global B), "local" (from zero B) and a newcomer's "ditto"; the
    # step count actually used is chosen on the client's validation split among 0, 1, 2, 4, ... and the budget
    personal_steps: int = 4
    ditto_lambda: float = 1.0  # "ditto"/"mix": proximal pull of the personal B toward the global B
    unseen_fraction: float = 0.0  # share of clients (a fixed set drawn by the seed) that never train: newcomers
    trace: bool = False  # also report finetune/local held-out metrics after 0, 1, 2, 4, ... steps (studies)
    max_clients: int = 0  # evaluate on at most this many clients (0: all)
    # true: an evaluation message is also a sync (seed-form catch-up, kept by the client). false: it carries the
    # dense global B for evaluation only, so training traffic is what training alone needs (compare sets this)
    sync: bool = True
    timeout_s: float = 600.0  # an evaluation gives up on the clients left when no reply came for this long
    retries: int = 1  # clients without an accepted reply (none, or an error) are sent their message again this often


@dataclass
class ClientSection:
    """How a client computes its losses; a SuperNode's node config may override both (see fedprge/task.py)."""

    backend: str = "eager"  # eager: PyTorch model | executorch: an exported .pte and a tokenizer, no model
    pte: str | None = None  # the program of backend=executorch (python -m fedprge.export writes it)


@dataclass
class ExportSection:
    """What a finished run writes besides its results (python -m fedprge.export adapters RUN_DIR does it later)."""

    adapters: bool = True  # RUN/adapters/global/: the global B as a PEFT LoRA adapter (transformers + peft load it)
    # a personalization method (one of eval.personalization) whose B every client keeps in RUN/personal/ at the final
    # evaluation, exported as RUN/adapters/client-<partition>/ (simulation: the clients share the run's disk); "": none
    personal: str = ""


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
    faults: FaultsSection = field(default_factory=FaultsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sim: SimSection = field(default_factory=SimSection)
    client: ClientSection = field(default_factory=ClientSection)
    export: ExportSection = field(default_factory=ExportSection)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora.rank, self.lora.alpha, tuple(self.lora.target_modules), self.lora.a_seed)

    def zo_config(self) -> ZOConfig:
        return ZOConfig(self.zo.q, self.zo.eps, self.zo.lr, self.zo.distribution, self.zo.clip)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid; {allowed}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value a run depends on; errors name the key, the bad value and what is allowed."""
    fed, data, ev, sim = cfg.federation, cfg.data, cfg.eval, cfg.sim
    _validate_numbers(cfg)
    cfg.lora_config()
    cfg.zo_config()
    _check(cfg.seed >= 0, "seed", cfg.seed, "it must be >= 0")
    _check(
        cfg.model.dtype in ("float32", "bfloat16", "float64"),
        "model.dtype",
        cfg.model.dtype,
        "choose float32, bfloat16 or float64",
    )
    _check(
        cfg.model.precision in PRECISION_CHOICES,
        "model.precision",
        cfg.model.precision,
        f"choose one of {PRECISION_CHOICES}",
    )
    _check(
        cfg.model.precision != "shared-bf16" or cfg.model.dtype == "float32",
        "model.precision",
        cfg.model.precision,
        "shared-bf16 needs model.dtype=float32",
    )
    _check(fed.clients >= 1, "federation.clients", fed.clients, "it must be >= 1")
    _check(fed.rounds >= 1, "federation.rounds", fed.rounds, "it must be >= 1")
    _check(0 < fed.fraction <= 1, "federation.fraction", fed.fraction, "it must be in (0, 1]")
    _check(fed.min_clients >= 1, "federation.min_clients", fed.min_clients, "it must be >= 1")
    _check(fed.local_steps >= 1, "federation.local_steps", fed.local_steps, "it must be >= 1")
    _check(fed.batch_size >= 1, "federation.batch_size", fed.batch_size, "it must be >= 1")
    _check(fed.downlink in DOWNLINKS, "federation.downlink", fed.downlink, f"choose one of {DOWNLINKS}")
    _check(fed.algorithm in ALGORITHMS, "federation.algorithm", fed.algorithm, f"choose one of {ALGORITHMS}")
    _check(fed.fo_lr > 0, "federation.fo_lr", fed.fo_lr, "it must be > 0")
    _check(fed.seed_scope in SEED_SCOPES, "federation.seed_scope", fed.seed_scope, f"choose one of {SEED_SCOPES}")
    _check(fed.pool_size >= 1, "federation.pool_size", fed.pool_size, "it must be >= 1")
    _check(fed.timeout_s > 0, "federation.timeout_s", fed.timeout_s, "it must be > 0")
    _validate_reliability(cfg)
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
    _check(0 <= ev.ditto_lambda < math.inf, "eval.ditto_lambda", ev.ditto_lambda, "it must be finite and >= 0")
    _check(0 <= ev.unseen_fraction < 1, "eval.unseen_fraction", ev.unseen_fraction, "it must be in [0, 1)")
    _check(0 <= data.val_fraction < 1, "data.val_fraction", data.val_fraction, "it must be in [0, 1)")
    _check(0 < ev.timeout_s < math.inf, "eval.timeout_s", ev.timeout_s, "it must be finite and > 0")
    _check(ev.retries >= 0, "eval.retries", ev.retries, "it must be >= 0 (0: no retry)")
    allowed = f"choose one of eval.personalization={list(ev.personalization)} or '' (none)"
    _check(cfg.export.personal in ("", *ev.personalization), "export.personal", cfg.export.personal, allowed)
    _check(sim.cpus >= 1, "sim.cpus", sim.cpus, "it must be >= 1")
    _check(sim.cpus_per_client >= 1, "sim.cpus_per_client", sim.cpus_per_client, "it must be >= 1")
    _validate_client(cfg)
    return cfg


def _validate_client(cfg: RunConfig) -> None:
    fed, cl = cfg.federation, cfg.client
    allowed = f"it must be in [0, federation.clients={fed.clients}] (0: all)"
    _check(0 <= fed.min_nodes <= fed.clients, "federation.min_nodes", fed.min_nodes, allowed)
    _check(0 <= fed.node_wait_s < math.inf, "federation.node_wait_s", fed.node_wait_s, "it must be >= 0 (0: timeout_s)")
    _check(cl.backend in CLIENT_BACKENDS, "client.backend", cl.backend, f"choose one of {CLIENT_BACKENDS}")
    if cl.backend == "executorch":
        _check(bool(cl.pte), "client.pte", cl.pte, "client.backend=executorch needs a .pte (python -m fedprge.export)")
        _check(cfg.model.dtype == "float32", "model.dtype", cfg.model.dtype, "an exported .pte runs in float32")
        prec = cfg.model.precision
        _check(prec != "shared-bf16", "model.precision", prec, "an exported .pte runs in float32")
    else:
        _check(cl.pte is None, "client.pte", cl.pte, "a program is only used with client.backend=executorch")


def _validate_numbers(cfg: RunConfig) -> None:
    """Numeric keys checked elsewhere without their dotted name (adapters, estimator, data loading)."""
    lora, zo, data = cfg.lora, cfg.zo, cfg.data
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "it must be in [0, 2**63)")
    _check(lora.rank >= 1, "lora.rank", lora.rank, "it must be >= 1")
    _check(0 < lora.alpha < math.inf, "lora.alpha", lora.alpha, "it must be finite and > 0")
    _check(0 <= lora.a_seed < 2**32, "lora.a_seed", lora.a_seed, "it must be in [0, 2**32)")
    _check(zo.q >= 1, "zo.q", zo.q, "the number of directions must be >= 1")
    _check(0 < zo.eps < math.inf, "zo.eps", zo.eps, "it must be finite and > 0")
    _check(0 < zo.lr < math.inf, "zo.lr", zo.lr, "it must be finite and > 0")
    _check(0 <= zo.clip < math.inf, "zo.clip", zo.clip, "it must be finite and >= 0 (0: off)")
    _check(0 < data.alpha < math.inf, "data.alpha", data.alpha, "the Dirichlet concentration must be finite, > 0")
    _check(data.chunk_words >= 1, "data.chunk_words", data.chunk_words, "it must be >= 1")
    _check(data.max_val_per_client >= 0, "data.max_val_per_client", data.max_val_per_client, "it must be >= 0")
    for key in ("max_train_per_client", "max_test_per_client"):
        _check(getattr(data, key) >= 1, f"data.{key}", getattr(data, key), "it must be >= 1")
    _check(cfg.eval.max_clients >= 0, "eval.max_clients", cfg.eval.max_clients, "it must be >= 0 (0: all)")


def _validate_reliability(cfg: RunConfig) -> None:
    fed, flt = cfg.federation, cfg.faults
    _check(fed.setup_timeout_s > 0, "federation.setup_timeout_s", fed.setup_timeout_s, "it must be > 0")
    _check(fed.catchup in CATCHUPS, "federation.catchup", fed.catchup, f"choose one of {CATCHUPS}")
    _check(fed.catchup_max_seeds >= 0, "federation.catchup_max_seeds", fed.catchup_max_seeds, "it must be >= 0")
    _check(fed.aggregation in AGGREGATIONS, "federation.aggregation", fed.aggregation, f"choose one of {AGGREGATIONS}")
    _check(0 <= fed.trim_fraction < 0.5, "federation.trim_fraction", fed.trim_fraction, "it must be in [0, 0.5)")
    _check(0 <= fed.norm_bound < math.inf, "federation.norm_bound", fed.norm_bound, "it must be finite, >= 0 (0: off)")
    _check(0 <= fed.max_abs_grad <= math.inf, "federation.max_abs_grad", fed.max_abs_grad, "it must be >= 0 (0: off)")
    _check(1 <= fed.max_count_ratio <= math.inf, "federation.max_count_ratio", fed.max_count_ratio, "it must be >= 1")
    allowed = "it must be in [0, federation.rounds) (0: never)"
    _check(0 <= fed.stop_after < fed.rounds, "federation.stop_after", fed.stop_after, allowed)
    _check(0 <= flt.drop_rate <= 1, "faults.drop_rate", flt.drop_rate, "it must be in [0, 1]")
    _check(0 <= flt.straggler_rate <= 1, "faults.straggler_rate", flt.straggler_rate, "it must be in [0, 1]")
    _check(0 <= flt.straggler_delay_s < math.inf, "faults.straggler_delay_s", flt.straggler_delay_s, "it must be >= 0")
    _check(0 <= flt.poison_fraction <= 1, "faults.poison_fraction", flt.poison_fraction, "it must be in [0, 1]")
    _check(flt.poison_kind in POISON_KINDS, "faults.poison_kind", flt.poison_kind, f"choose one of {POISON_KINDS}")
    _check(math.isfinite(flt.poison_scale), "faults.poison_scale", flt.poison_scale, "it must be finite")
    rate = "it must be in [0, 1]"
    _check(0 <= flt.eval_straggler_rate <= 1, "faults.eval_straggler_rate", flt.eval_straggler_rate, rate)
    _check(0 <= flt.eval_delay_s < math.inf, "faults.eval_delay_s", flt.eval_delay_s, "it must be finite and >= 0")
    _check(0 <= flt.eval_drop_rate <= 1, "faults.eval_drop_rate", flt.eval_drop_rate, rate)
    _check(flt.eval_drop_attempts >= 0, "faults.eval_drop_attempts", flt.eval_drop_attempts, "it must be >= 0")


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
