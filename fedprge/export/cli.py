"""``python -m fedprge.export``: write a P-RGE ExecuTorch program (.pte) and its sidecar spec (.json).

``python -m fedprge.export adapters RUN_DIR [--merged] [--pte]``: write a finished (or checkpointed) run's
B as standard PEFT LoRA adapters, optionally merged into the base model and exported for ExecuTorch inference.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedprge.config import LoRASection, ZOSection
from fedprge.engine import rng
from fedprge.engine.adapters import LoRAConfig
from fedprge.export.lower import BACKENDS, export_pte, spec_path


def parser() -> argparse.ArgumentParser:
    lora, zo = LoRASection(), ZOSection()
    p = argparse.ArgumentParser(prog="python -m fedprge.export", description=__doc__)
    p.add_argument("--model", default="tiny", help='"tiny", "smollm2" or a local Hugging Face model folder')
    p.add_argument("--q", type=int, default=zo.q, help="directions per step (the program returns 2q losses)")
    p.add_argument("--bs", type=int, default=1, help="batch size (static)")
    p.add_argument("--max-len", type=int, default=48, help="sequence length T (static; shorter batches are padded)")
    p.add_argument("--backend", choices=BACKENDS, default="xnnpack", help="XNNPACK delegate or portable kernels only")
    p.add_argument("--out", default="program.pte", help="output .pte (the spec goes next to it as .json)")
    p.add_argument("--rank", type=int, default=lora.rank)
    p.add_argument("--alpha", type=float, default=lora.alpha)
    p.add_argument("--targets", nargs="+", default=list(lora.target_modules), help="LoRA target module names")
    p.add_argument("--a-seed", type=int, default=lora.a_seed, help="seed of the frozen LoRA A matrices")
    p.add_argument("--eps", type=float, default=zo.eps, help="perturbation size")
    p.add_argument("--distribution", choices=rng.DISTRIBUTIONS, default=zo.distribution)
    p.add_argument("--seed", type=int, default=0, help='initialisation seed of the "tiny" model')
    return p


def adapters_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedprge.export adapters",
        description="Write a run's global B (and any personal B it kept) as PEFT LoRA adapters with model cards.",
    )
    p.add_argument("run", help="run folder (config.yaml + global_b.pt, or checkpoint.pt of an unfinished run)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/adapters)")
    p.add_argument("--merged", action="store_true", help="also the base model with the global adapter merged in")
    p.add_argument("--pte", action="store_true", help="also an ExecuTorch next-token program of the merged model")
    p.add_argument("--backend", choices=BACKENDS, default="xnnpack", help="backend of the --pte program")
    p.add_argument("--max-len", type=int, default=128, help="static token length of the --pte program")
    return p


def adapters_main(argv: Sequence[str]) -> int:
    from fedprge.export.peft_adapters import export_run

    args = adapters_parser().parse_args(argv)
    logging.getLogger("executorch").setLevel(logging.ERROR)
    try:
        result = export_run(
            args.run, args.out, merged=args.merged, pte=args.pte, backend=args.backend, max_len=args.max_len
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for tag, folder in result.adapters.items():
        print(f"wrote {tag} adapter: {folder}")
    if result.merged is not None:
        print(f"wrote merged model: {result.merged}")
    if result.pte is not None:
        print(f"wrote inference program: {result.pte} ({result.pte.stat().st_size / 2**20:.1f} MiB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["adapters"]:
        return adapters_main(argv[1:])
    args = parser().parse_args(argv)
    logging.getLogger("executorch").setLevel(logging.ERROR)
    try:
        lora = LoRAConfig(args.rank, args.alpha, tuple(args.targets), args.a_seed)
        path, spec, seconds = export_pte(
            args.out,
            args.model,
            q=args.q,
            eps=args.eps,
            batch_size=args.bs,
            seq_len=args.max_len,
            backend=args.backend,
            lora=lora,
            distribution=args.distribution,
            model_seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size:.1f} MiB, exported in {seconds:.1f} s) and {spec_path(path)}: model={spec.model} "
        f"P={spec.num_params} q={spec.q} bs={spec.batch_size} T={spec.seq_len} backend={spec.backend}"
    )
    return 0
