"""What a run configuration may hold, and :func:`validate`: errors name the key, the bad value and what is allowed."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from fedprge.checks import check_range
from fedprge.data.federated import PARTITIONS
from fedprge.engine.shared_base import PRECISION_CHOICES

if TYPE_CHECKING:
    from fedprge.config import RunConfig

DTYPES = ("float32", "bfloat16", "float64")
DOWNLINKS = ("weights", "seeds", "pool")
ALGORITHMS = ("prge", "fedavg_lora_fa", "fedavg_lora", "fedavg_full")
SEED_SCOPES = ("client", "round")
PERSONALIZATION = ("global", "local", "finetune", "personal", "ditto", "mix", "prior")
CLIENT_BACKENDS = ("eager", "executorch")
AGGREGATIONS = ("mean", "trimmed_mean", "median")
CATCHUPS = ("auto", "seeds")
POISON_KINDS = ("nan", "inf", "huge", "wrong_count", "scaled", "count")
PRIVACY_MODES = ("off", "local", "central")
DEVICES = ("cpu", "cuda")

# every numeric key: its interval (an integer one where the field is an int; "inf]" admits infinity) and a note
RANGES: tuple[tuple[str, str, str], ...] = (
    ("seed", "[0, 2**63)", ""),
    ("lora.rank", "[1, inf)", ""),
    ("lora.alpha", "(0, inf)", ""),
    ("lora.a_seed", "[0, 2**32)", ""),
    ("zo.q", "[1, inf)", "the number of directions"),
    ("zo.eps", "(0, inf)", ""),
    ("zo.lr", "(0, inf)", ""),
    ("zo.clip", "[0, inf)", "0: off"),
    ("data.alpha", "(0, inf)", "the Dirichlet concentration"),
    ("data.max_len", "[4, inf)", ""),
    ("data.chunk_words", "[1, inf)", ""),
    ("data.test_fraction", "(0, 1)", ""),
    ("data.val_fraction", "[0, 1)", ""),
    ("data.max_train_per_client", "[1, inf)", ""),
    ("data.max_test_per_client", "[1, inf)", ""),
    ("data.max_val_per_client", "[0, inf)", ""),
    ("federation.fo_lr", "(0, inf]", ""),
    ("federation.clients", "[1, inf)", ""),
    ("federation.rounds", "[1, inf)", ""),
    ("federation.fraction", "(0, 1]", ""),
    ("federation.min_clients", "[1, inf)", ""),
    ("federation.node_wait_s", "[0, inf)", "0: timeout_s"),
    ("federation.local_steps", "[1, inf)", ""),
    ("federation.batch_size", "[1, inf)", ""),
    ("federation.pool_size", "[1, inf)", ""),
    ("federation.timeout_s", "(0, inf]", ""),
    ("federation.setup_timeout_s", "(0, inf]", ""),
    ("federation.catchup_max_seeds", "[0, inf)", "0: no limit"),
    ("federation.trim_fraction", "[0, 0.5)", ""),
    ("federation.norm_bound", "[0, inf)", "0: off"),
    ("federation.max_abs_grad", "[0, inf]", "0: off"),
    ("federation.max_count_ratio", "[1, inf]", ""),
    ("faults.drop_rate", "[0, 1]", ""),
    ("faults.straggler_rate", "[0, 1]", ""),
    ("faults.straggler_delay_s", "[0, inf)", ""),
    ("faults.poison_fraction", "[0, 1]", ""),
    ("faults.eval_straggler_rate", "[0, 1]", ""),
    ("faults.eval_delay_s", "[0, inf)", ""),
    ("faults.eval_drop_rate", "[0, 1]", ""),
    ("faults.eval_drop_attempts", "[0, inf)", ""),
    ("eval.every", "[0, inf)", "0: only before and after training"),
    ("eval.curve_clients", "[0, inf)", "0: all clients"),
    ("eval.personal_steps", "[1, inf)", ""),
    ("eval.ditto_lambda", "[0, inf)", ""),
    ("eval.unseen_fraction", "[0, 1)", ""),
    ("eval.timeout_s", "(0, inf)", ""),
    ("eval.retries", "[0, inf)", "0: no retry"),
    ("eval.max_clients", "[0, inf)", "0: all"),
    ("sim.cpus", "[1, inf)", ""),
    ("sim.cpus_per_client", "[1, inf)", ""),
    ("sim.gpus_per_client", "[0, inf)", "a share of one GPU per simulated client"),
    ("privacy.clip", "(0, inf)", "the L2 bound C of a client's round vector"),
    ("privacy.noise_multiplier", "[0, inf)", "0: clipping only"),
    ("privacy.epsilon", "[0, inf)", "0: no target, use privacy.noise_multiplier"),
    ("privacy.delta", "(0, 1)", ""),
    ("privacy.secagg_range", "(0, inf)", "c: uplinked values are clipped to [-c, c]"),
    ("privacy.secagg_quantization", "[2, 2**31]", "Q: fixed-point levels over [-c, c]"),
    ("privacy.secagg_shares", "(0, 1]", "a share of the round's clients"),
    ("privacy.secagg_threshold", "(0, 1]", "a share of privacy.secagg_shares"),
)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid; {allowed}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, value, f"choose one of {allowed}")


def _numeric(cfg: RunConfig, key: str) -> tuple[Any, bool]:
    """The value of a dotted key and whether its field is an int."""
    *sections, name = key.split(".")
    section = cfg
    for s in sections:
        section = getattr(section, s)
    return getattr(section, name), next(f.type for f in fields(section) if f.name == name) in ("int", int)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value a run depends on."""
    for key, interval, note in RANGES:
        value, integer = _numeric(cfg, key)
        check_range(key, value, interval, integer=integer, note=note)
    cfg.lora_config()
    cfg.zo_config()
    fed, data, ev, flt = cfg.federation, cfg.data, cfg.eval, cfg.faults
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.precision", cfg.model.precision, PRECISION_CHOICES)
    prec, allowed = cfg.model.precision, "shared-bf16 needs model.dtype=float32"
    _check(prec != "shared-bf16" or cfg.model.dtype == "float32", "model.precision", prec, allowed)
    _choice("model.device", cfg.model.device, DEVICES)
    allowed = "only federation.algorithm=prge runs on cuda; use model.device=cpu"
    _check(cfg.model.device == "cpu" or fed.algorithm == "prge", "model.device", cfg.model.device, allowed)
    _choice("federation.downlink", fed.downlink, DOWNLINKS)
    _choice("federation.algorithm", fed.algorithm, ALGORITHMS)
    _choice("federation.seed_scope", fed.seed_scope, SEED_SCOPES)
    _choice("federation.catchup", fed.catchup, CATCHUPS)
    _choice("federation.aggregation", fed.aggregation, AGGREGATIONS)
    allowed = "it must be in [0, federation.rounds) (0: never)"
    _check(0 <= fed.stop_after < fed.rounds, "federation.stop_after", fed.stop_after, allowed)
    _choice("faults.poison_kind", flt.poison_kind, POISON_KINDS)
    _check(math.isfinite(flt.poison_scale), "faults.poison_scale", flt.poison_scale, "it must be finite")
    _choice("data.partition", data.partition, PARTITIONS)
    bad = [m for m in ev.personalization if m not in PERSONALIZATION]
    _check(not bad, "eval.personalization", bad, f"methods must be among {PERSONALIZATION}")
    allowed = f"choose one of eval.personalization={list(ev.personalization)} or '' (none)"
    _check(cfg.export.personal in ("", *ev.personalization), "export.personal", cfg.export.personal, allowed)
    _validate_client(cfg)
    _validate_privacy(cfg)
    _validate_secagg(cfg)
    return cfg


def _validate_privacy(cfg: RunConfig) -> None:
    """DP-ZO settings and the ones they cannot work with; each error names both settings."""
    p, fed = cfg.privacy, cfg.federation
    _choice("privacy.mode", p.mode, PRIVACY_MODES)
    if p.mode == "off":
        return
    allowed = "set privacy.noise_multiplier or a target privacy.epsilon, not both"
    _check(not (p.epsilon > 0 and p.noise_multiplier > 0), "privacy.epsilon", p.epsilon, allowed)
    allowed = f"a user-level delta must be < 1/federation.clients={1 / fed.clients:.3g}"
    _check(p.delta < 1 / fed.clients, "privacy.delta", p.delta, allowed)
    allowed = f"privacy.mode={p.mode!r} needs federation.algorithm='prge'"
    _check(fed.algorithm == "prge", "federation.algorithm", fed.algorithm, allowed)
    if p.mode == "central":
        allowed = "privacy.mode='central' needs federation.seed_scope='round' (one set of directions per round)"
        _check(fed.seed_scope == "round", "federation.seed_scope", fed.seed_scope, allowed)
        allowed = "privacy.mode='central' needs federation.aggregation='mean' (the noise is calibrated to a mean)"
        _check(fed.aggregation == "mean", "federation.aggregation", fed.aggregation, allowed)
        allowed = "privacy.mode='central' cannot use downlink='pool' (pool seeds may merge directions)"
        _check(fed.downlink != "pool", "federation.downlink", fed.downlink, allowed)


def _validate_secagg(cfg: RunConfig) -> None:
    """SecAgg+ hides every individual reply: each setting that needs one (or per-client directions) is refused."""
    if not cfg.privacy.secagg:
        return
    from fedprge.federation.sampling import sample_round  # a config module may not import the federation at load

    fed, why = cfg.federation, "privacy.secagg=true"
    _check(fed.algorithm == "prge", "federation.algorithm", fed.algorithm, f"{why} needs federation.algorithm='prge'")
    allowed = f"{why} needs federation.seed_scope='round' (the server may only learn the sum of shared-seed scalars)"
    _check(fed.seed_scope == "round", "federation.seed_scope", fed.seed_scope, allowed)
    allowed = f"{why} needs federation.aggregation='mean' (a median or a trim needs every client's scalars)"
    _check(fed.aggregation == "mean", "federation.aggregation", fed.aggregation, allowed)
    allowed = f"{why} hides each client's norm: set federation.norm_bound=0 (clients clip to privacy.secagg_range)"
    _check(fed.norm_bound == 0, "federation.norm_bound", fed.norm_bound, allowed)
    allowed = f"{why} hides each reply: set federation.max_abs_grad=0 (clients clip to privacy.secagg_range)"
    _check(fed.max_abs_grad == 0, "federation.max_abs_grad", fed.max_abs_grad, allowed)
    allowed = f"{why} cannot send a client's B to the server (federation.verify replays one client's scalars)"
    _check(not fed.verify, "federation.verify", fed.verify, allowed)
    n = len(sample_round(cfg, fed.clients, 1))
    allowed = f"it samples {n} client(s) per round; {why} needs at least 2 (the sum of one is that client's scalars)"
    _check(n >= 2, "federation.fraction", fed.fraction, allowed)
    q = cfg.privacy.secagg_quantization
    allowed = f"with {why}, {n} clients per round x {q} levels must stay below SecAgg+'s modulus 2**32"
    _check(n * q < 2**32, "privacy.secagg_quantization", q, allowed)


def _validate_client(cfg: RunConfig) -> None:
    fed, cl = cfg.federation, cfg.client
    allowed = f"it must be in [0, federation.clients={fed.clients}] (0: all)"
    _check(0 <= fed.min_nodes <= fed.clients, "federation.min_nodes", fed.min_nodes, allowed)
    _choice("client.backend", cl.backend, CLIENT_BACKENDS)
    if cl.backend == "executorch":
        _check(bool(cl.pte), "client.pte", cl.pte, "client.backend=executorch needs a .pte (python -m fedprge.export)")
        _check(cfg.model.dtype == "float32", "model.dtype", cfg.model.dtype, "an exported .pte runs in float32")
        prec = cfg.model.precision
        _check(prec != "shared-bf16", "model.precision", prec, "an exported .pte runs in float32")
        _check(cfg.model.device == "cpu", "model.device", cfg.model.device, "an exported .pte runs on the CPU")
    else:
        _check(cl.pte is None, "client.pte", cl.pte, "a program is only used with client.backend=executorch")
