"""One typed configuration for a run: dataclass defaults <- YAML files <- dotlist overrides (omegaconf).

The allowed values and :func:`~fedprge.config_rules.validate` live in :mod:`fedprge.config_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedprge.config_rules import validate
from fedprge.engine.adapters import LoRAConfig
from fedprge.engine.estimator import ZOConfig
from fedprge.engine.seeds import SeedSpec


@dataclass
class ModelSection:
    name: str = "smollm2"  # "tiny", "smollm2" or a local Hugging Face model folder
    dtype: str = "float32"
    # auto | float32 | shared-bf16: a P-RGE forward's frozen matmuls in bf16 as replica 0 + differences (~3x faster
    # on CPUs with bf16 units, projected gradients a few % off fp32; README "Performance"); auto: shared-bf16 where
    # the device running the client's forward has bf16 units (CUDA, AVX-512 BF16, AMX), float32 elsewhere;
    # evaluation: fp32
    precision: str = "auto"
    # cpu | cuda: where a client's forward runs (states, seeds and updates stay on the host); cuda: algorithm=prge
    device: str = "cpu"


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
    q: int = 2  # with local_steps 20: the equal-compute study's winner per forward (README, "Learning per forward")
    eps: float = 1e-2
    lr: float = 3e-2  # chosen on validation for q = 2 by the same study
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
    local_steps: int = 20  # x zo.q = 40 directions, 80 replica-forwards per client-round
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
    personalization: list[str] = field(default_factory=lambda: ["global", "finetune", "local", "personal", "prior"])
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
class PrivacySection:
    """DP-ZO on the projected gradients; unit: one client's whole round (fedprge/privacy.py, README "Privacy")."""

    mode: str = "off"  # off | local (clients clip and add noise) | central (clients clip, the server adds noise)
    clip: float = 1.0  # C: L2 bound on a client's round vector of local_steps x q projected gradients
    noise_multiplier: float = 0.0  # sigma: noise std is sigma x C (0: clipping only, epsilon infinite)
    epsilon: float = 0.0  # target epsilon: calibrate sigma with the accountant instead (0: use noise_multiplier)
    delta: float = 1e-5  # must be < 1 / federation.clients (a user-level delta at or above 1/N protects no one)
    # SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod): the server learns only the weighted mean of a round's
    # scalars, never one client's (fedprge/federation/secagg.py); needs seed_scope=round and no per-client server rule
    secagg: bool = False
    secagg_range: float = 8.0  # c: every uplinked value is clipped to [-c, c] on the client (counted) before encoding
    secagg_quantization: int = 4194304  # Q (2**22): fixed-point levels over [-c, c]; error <= 3 n c / Q per coefficient
    secagg_shares: float = 1.0  # share of the round's clients that hold a share of each client's secrets
    secagg_threshold: float = 0.5  # share of those shares needed to unmask: tolerates the rest dropping out


@dataclass
class SimSection:
    cpus: int = 2  # CPUs Ray may use on this machine
    cpus_per_client: int = 1  # one torch thread per Ray worker: the only stable timing on small machines
    gpus_per_client: float = 0.0  # a share of one GPU per simulated client (model.device=cuda), e.g. 0.25
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
    privacy: PrivacySection = field(default_factory=PrivacySection)

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(self.lora.rank, self.lora.alpha, tuple(self.lora.target_modules), self.lora.a_seed)

    def zo_config(self) -> ZOConfig:
        return ZOConfig(self.zo.q, self.zo.eps, self.zo.lr, self.zo.distribution, self.zo.clip)

    def seed_spec(self) -> SeedSpec:
        fed = self.federation
        return SeedSpec(self.seed, self.zo.q, fed.seed_scope, fed.pool_size if fed.downlink == "pool" else 0)


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
