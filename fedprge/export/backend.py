"""The ExecuTorch client backend: a P-RGE .pte and a tokenizer; no PyTorch model in the process.

:class:`PTEBackend` is what :class:`fedprge.task.Task` uses with ``client.backend=executorch``. A step is

    losses = program.forward(input_ids, attention_mask, labels, seeds, b)      2q losses, z drawn in-program
    g_i    = (L+_i - L-_i) / (2 eps)                                           on the host
    b     <- b - (lr / q) sum_i g_i z_i                                        z from rng on the host

i.e. :func:`fedprge.engine.estimator.finish_step`, the same code as the eager path and the server's replay; the
host's z equals the program's bit for bit. Held-out losses come from the program's ``nll`` method.

:func:`check_program` refuses a .pte whose export settings (q, eps, distribution, LoRA, model, shapes) do not
match the run, naming each mismatch and the export command that would match.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import torch

from fedprge.config import RunConfig
from fedprge.engine.backend import Batch
from fedprge.engine.estimator import ZOConfig
from fedprge.export.lower import ProgramSpec, spec_path
from fedprge.export.runtime import PTEProgram


class PTEBackend:
    """:class:`~fedprge.engine.backend.Backend` over a .pte: the program draws z from the seeds itself."""

    def __init__(self, program: PTEProgram) -> None:
        self.program = program
        self.num_params = program.num_params
        self.per_token = False  # its nll method returns per-example sums

    def perturbed_losses(
        self, b: torch.Tensor, batch: Batch, seeds: Sequence[int], zo: ZOConfig, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(2q,) losses of b + eps z_i (first q) and b - eps z_i (last q), computed by the program, which draws z
        from the seeds itself (a host's ``z`` is not needed)."""
        spec = self.program.spec
        if spec is not None and (spec.eps, spec.distribution) != (float(zo.eps), zo.distribution):
            raise ValueError(
                f"{self.program.path.name} was exported for eps={spec.eps!r}, distribution={spec.distribution!r}; "
                f"this step asks for eps={zo.eps!r}, distribution={zo.distribution!r}: export a matching program"
            )
        return self.program.losses(seeds, b, batch)

    def example_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed NLL and target counts, in chunks of the program's static batch size."""
        rows, step = batch["input_ids"].shape[0], self.program.batch_size
        parts = [self.program.nll(b, {k: v[i : i + step] for k, v in batch.items()}) for i in range(0, rows, step)]
        return torch.cat([s for s, _ in parts]), torch.cat([c for _, c in parts])

    def token_nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(
            "this .pte's nll method returns per-example sums, not per-token losses; the 'prior' personalization of a "
            "language-modelling task needs client.backend=eager"
        )


def export_args(cfg: RunConfig) -> list[str]:
    """Arguments of ``python -m fedprge.export`` for a program that matches ``cfg`` (add --out/--backend)."""
    lora, zo = cfg.lora, cfg.zo
    args = ["--model", cfg.model.name, "--q", str(zo.q), "--eps", repr(float(zo.eps))]
    args += ["--distribution", zo.distribution, "--bs", str(cfg.federation.batch_size)]
    args += ["--max-len", str(cfg.data.max_len), "--rank", str(lora.rank), "--alpha", repr(float(lora.alpha))]
    args += ["--targets", *lora.target_modules, "--a-seed", str(lora.a_seed), "--seed", str(cfg.seed)]
    return args


def export_command(cfg: RunConfig, out: str | Path = "program.pte") -> str:
    return shlex.join(["python", "-m", "fedprge.export", *export_args(cfg), "--out", str(out)])


def check_spec(cfg: RunConfig, spec: ProgramSpec, path: str | Path) -> None:
    """Raise ValueError naming every export setting in ``spec`` (of the .pte at ``path``) that ``cfg`` contradicts."""
    zo, lora = cfg.zo_config(), cfg.lora_config()
    bad = []
    for key, have, want in (
        ("zo.q", spec.q, zo.q),
        ("zo.eps", spec.eps, float(zo.eps)),
        ("zo.distribution", spec.distribution, zo.distribution),
        ("lora", spec.lora_config(), lora),
        ("model.name", spec.model, cfg.model.name),
    ):
        if have != want:
            bad.append(f"{key}: the program has {have!r}, the run {want!r}")
    if cfg.model.name == "tiny" and spec.model_seed != cfg.seed:
        bad.append(f"seed: the tiny model was initialised from seed {spec.model_seed}, the run uses {cfg.seed}")
    if spec.batch_size < cfg.federation.batch_size:
        bad.append(f"federation.batch_size={cfg.federation.batch_size} > the program's {spec.batch_size} rows")
    if spec.seq_len < cfg.data.max_len:
        bad.append(f"data.max_len={cfg.data.max_len} > the program's {spec.seq_len} tokens")
    if bad:
        raise ValueError(
            f"ExecuTorch program {str(path)!r} does not match this run: "
            + "; ".join(bad)
            + f". Export a matching one with: {export_command(cfg, path)}"
        )


def read_spec(path: str | Path) -> ProgramSpec:
    """The sidecar spec of a .pte; a client refuses a program without one (it could not check eps or LoRA)."""
    sidecar = spec_path(path)
    if not sidecar.is_file():
        raise ValueError(
            f"{str(path)!r} has no sidecar spec {sidecar.name!r} next to it; it records eps, the LoRA layout and "
            "the model, which a client must check: keep the .json that python -m fedprge.export writes with the .pte"
        )
    return ProgramSpec.load(sidecar)


def check_program(cfg: RunConfig, program: PTEProgram) -> None:
    """Raise ValueError if the loaded ``program`` (its sidecar spec and its real input shapes) does not fit ``cfg``."""
    spec = read_spec(program.path)
    real = (program.q, program.batch_size, program.seq_len, program.num_params)
    if real != (spec.q, spec.batch_size, spec.seq_len, spec.num_params):
        raise ValueError(
            f"{spec_path(program.path).name!r} does not describe {str(program.path)!r}: the program has "
            f"(q, batch_size, seq_len, P) = {real}, the spec {(spec.q, spec.batch_size, spec.seq_len, spec.num_params)}"
        )
    check_spec(cfg, spec, program.path)


def load_pte_backend(cfg: RunConfig, num_threads: int = 1) -> PTEBackend:
    """The run's ``client.pte`` loaded with ExecuTorch's runtime and checked against ``cfg``."""
    path = Path(str(cfg.client.pte)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"client.pte={str(path)!r} does not exist on this client; export it with: {export_command(cfg, path)}"
        )
    program = PTEProgram(path, num_threads=num_threads)
    check_program(cfg, program)
    return PTEBackend(program)
