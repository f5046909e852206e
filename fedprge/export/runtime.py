"""Run an exported P-RGE .pte with ExecuTorch's runtime (its native Python binding, no compiler imported).

The program's input shapes (batch size, sequence length, q, P) are read from the .pte's method metadata;
batches with fewer rows or tokens are padded to them (pad id, attention mask 0, label -100 for tokens; pad
rows are unlabelled), longer ones are rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fedprge.data.encode import IGNORE_INDEX
from fedprge.engine import rng
from fedprge.engine.backend import Batch
from fedprge.export.lower import METHODS, ProgramSpec, spec_path

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def native():
    """ExecuTorch's native runtime module (the one ``executorch.runtime`` wraps).

    Imported directly: its wrapper ``portable_lib``, and with it ``executorch.runtime``, first imports the whole
    exir compiler and torch._dynamo (3-5 s and ~100 MB more per client process) for a warning class. A client
    process needs only this binding and its kernels (portable ops, XNNPACK delegate).
    """
    from executorch.extension.pybindings import _portable_lib

    return _portable_lib


def set_threads(num_threads: int) -> None:
    """Size ExecuTorch's (process-wide) threadpool, used by XNNPACK and some portable kernels."""
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads} is invalid; it must be >= 1")
    if native()._threadpool_get_thread_count() != num_threads:
        native()._unsafe_reset_threadpool(num_threads)


class PTEProgram:
    """A P-RGE .pte: :meth:`losses` (the 2q perturbed losses), :meth:`directions` (the in-program z) and
    :meth:`nll` (per-example NLL of one state)."""

    def __init__(self, path: str | Path, num_threads: int | None = None, one_method: bool = True) -> None:
        self.path = Path(path)
        self.one_method = one_method
        if not self.path.is_file():
            raise FileNotFoundError(f"ExecuTorch program {str(self.path)!r} does not exist")
        if num_threads is not None:
            set_threads(num_threads)
        self.program = native()._load_program(str(self.path))
        self.method_names = {self.program.get_method_name(i) for i in range(self.program.num_methods())}
        missing = [m for m in METHODS if m not in self.method_names]
        if missing:
            raise ValueError(
                f"{str(self.path)!r} has methods {sorted(self.method_names)}; a P-RGE program needs "
                f"{METHODS} (re-export it with python -m fedprge.export)"
            )
        meta = self.program.method_meta("forward")
        self.batch_size, self.seq_len = meta.input_tensor_meta(0).sizes()
        (self.q,) = meta.input_tensor_meta(3).sizes()
        (self.num_params,) = meta.input_tensor_meta(4).sizes()
        sidecar = spec_path(self.path)
        self.spec: ProgramSpec | None = ProgramSpec.load(sidecar) if sidecar.exists() else None
        self.pad_token_id = self.spec.pad_token_id if self.spec else 0
        self._methods: dict[str, object] = {}

    def _method(self, name: str):
        """A method, loaded on first use (its planned memory and, with XNNPACK, its own packed copy of the weights).

        With ``one_method`` (the default) loading one unloads the others: an evaluation that alternates between
        ``forward`` and ``nll`` reloads (0.3 s for SmolLM2-135M) instead of holding two packed copies (+0.7 GB).
        """
        if name not in self._methods:
            if self.one_method:
                self._methods.clear()
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def _seeds(self, seeds: torch.Tensor | Sequence[int]) -> torch.Tensor:
        s = torch.as_tensor(list(seeds) if not isinstance(seeds, torch.Tensor) else seeds, dtype=torch.int64)
        if s.shape != (self.q,):
            raise ValueError(f"seeds have shape {tuple(s.shape)}; this program was exported for q={self.q}")
        rng.check_seeds(s)
        return s.contiguous()

    def pad(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch`` right-padded to the exported (batch_size, seq_len); rejects larger batches."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; it needs {BATCH_KEYS}")
        shapes = {tuple(batch[k].shape) for k in BATCH_KEYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"batch tensors must share one (bs, T) shape; got {sorted(shapes)}")
        bs, t = next(iter(shapes))
        if bs > self.batch_size or t > self.seq_len:
            raise ValueError(
                f"batch of shape ({bs}, {t}) does not fit {self.path.name}, exported for (batch_size, seq_len) = "
                f"({self.batch_size}, {self.seq_len}); use batches of at most {self.seq_len} tokens and "
                f"{self.batch_size} rows, or export with larger --bs/--max-len"
            )
        shape = (self.batch_size, self.seq_len)
        ids = torch.full(shape, self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros(shape, dtype=torch.int64)
        mask[bs:] = 1  # pad rows: ordinary unlabelled sequences (a fully masked row would make SDPA produce NaN)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
        ids[:bs, :t], mask[:bs, :t], labels[:bs, :t] = (batch[k].to(torch.int64) for k in BATCH_KEYS)
        return ids, mask, labels

    def losses(self, seeds: torch.Tensor | Sequence[int], b: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(2q,) losses of b + eps z_i (first q) and b - eps z_i (last q), z_i drawn in-program from seeds[i]."""
        if b.shape != (self.num_params,):
            raise ValueError(f"b has shape {tuple(b.shape)}; this program's adapters have ({self.num_params},)")
        inputs = (*self.pad(batch), self._seeds(seeds), b.to(torch.float32).contiguous())
        return self._method("forward")(inputs)[0].clone()

    def directions(self, seeds: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(q, P) directions computed by the program; equal to ``rng.directions(seeds, P)`` bit for bit."""
        return self._method("directions")((self._seeds(seeds),))[0].clone()

    def nll(self, b: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example summed NLL (float32) and labelled-token counts (int64) of ``batch`` under state ``b``."""
        if b.shape != (self.num_params,):
            raise ValueError(f"b has shape {tuple(b.shape)}; this program's adapters have ({self.num_params},)")
        rows = batch["input_ids"].shape[0] if "input_ids" in batch else 0
        sums, counts = self._method("nll")((*self.pad(batch), b.to(torch.float32).contiguous()))
        return sums[:rows].clone(), counts[:rows].clone()
