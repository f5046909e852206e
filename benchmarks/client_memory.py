"""Peak memory of a client process: eager PyTorch client vs ExecuTorch client (.pte + tokenizer, no model).

Each variant runs in a fresh child process that does what one ``flwr-clientapp`` process of a SuperNode does for
a ``train`` and an ``evaluate`` message: import the ClientApp module, build the run's Task (model or program,
tokenizer, the client's data), run ``federation.local_steps`` P-RGE steps, evaluate on the held-out text. Reported:
RSS after the imports, after the Task is built, the peak (VmHWM) and, at the end, its anonymous (heap, packed
weights, planned arenas) and file-backed (mmapped program or weights, libraries) parts, plus seconds per phase.

    python benchmarks/client_memory.py                                   # tiny, configs/smoke.yaml
    python benchmarks/client_memory.py --model smollm2 --config ''       # SmolLM2-135M, default run config

Results: a table, and benchmarks/results/client_memory-<model>.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedprge.procmem import status_mib

VARIANTS = ("eager", "executorch-xnnpack", "executorch-portable")


def child(config_yaml: str, pte: str | None) -> dict:
    t0 = time.perf_counter()
    import torch

    from fedprge.federation import client_app  # noqa: F401 (what flwr-clientapp imports)
    from fedprge.task import client_overrides, load_task

    rss_imports, t1 = status_mib("VmRSS"), time.perf_counter()
    task = load_task(config_yaml, *client_overrides({"pte": pte} if pte else {}))
    rss_task, t2 = status_mib("VmRSS"), time.perf_counter()
    res = task.train(torch.zeros(task.num_params), 0, 1)
    t3 = time.perf_counter()
    metrics = task.evaluate(res.b, 0)
    t4 = time.perf_counter()
    heavy = [m for m in ("peft", "transformers.modeling_utils", "executorch.exir") if m in sys.modules]
    return {
        "backend": type(task.backend).__name__,
        "rss_imports_mib": rss_imports,
        "rss_task_mib": rss_task,
        "peak_rss_mib": status_mib("VmHWM"),
        "end_rss_anon_mib": status_mib("RssAnon"),  # private memory at the end (heap, packed weights, arenas)
        "end_rss_file_mib": status_mib("RssFile"),  # file-backed pages (mmapped program/weights, libraries)
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "train_s": t3 - t2,
        "eval_s": t4 - t3,
        "eval_loss": metrics["loss"],
        "heavy_modules": heavy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smoke.yaml", help="run config YAML ('' for the defaults)")
    p.add_argument("--model", help="model.name override (tiny, smollm2, a local HF folder)")
    p.add_argument("--pte-dir", help="where the .pte files are exported (reused when present; default: a temp dir)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default="benchmarks/results", help="folder for the CSV and JSON results")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--pte", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child).read_text(), args.pte)))
        return

    from fedprge.config import load_config, to_yaml
    from fedprge.export.backend import export_args

    over = [*args.overrides, *([f"model.name={args.model}"] if args.model else [])]
    cfg = load_config([args.config] if args.config else [], over)
    folder = Path(args.pte_dir or tempfile.mkdtemp(prefix="client_memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    yaml = folder / "run.yaml"
    yaml.write_text(to_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", str(yaml)]
        if variant != "eager":
            backend = variant.removeprefix("executorch-")
            pte = folder / f"{Path(cfg.model.name).name}-{backend}.pte"
            if not (pte.exists() and pte.with_suffix(".json").exists()):
                print(f"exporting {pte.name} ...", file=sys.stderr, flush=True)
                exp = [sys.executable, "-m", "fedprge.export", *export_args(cfg), "--backend", backend]
                subprocess.run([*exp, "--out", str(pte)], check=True, capture_output=True, text=True)
            cmd += ["--pte", str(pte)]
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append({"variant": variant, "model": cfg.model.name, **json.loads(proc.stdout.strip().splitlines()[-1])})
    report(rows, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"client_memory-{Path(cfg.model.name).name}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.csv and {stem}.json")


def report(rows: list[dict], cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    fed = cfg.federation
    t = Table(
        title=f"one client process (train {fed.local_steps} steps + evaluate) on {cfg.model.name}, q={cfg.zo.q}, "
        f"bs={fed.batch_size}, T<={cfg.data.max_len}"
    )
    cols = ("variant", "RSS imports", "RSS loaded", "peak RSS MiB", "end anon", "end file", "load s", "train s")
    for c in (*cols, "eval s", "eval loss"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["variant"],
            *(f"{r[k]:.0f}" for k in ("rss_imports_mib", "rss_task_mib", "peak_rss_mib")),
            *(f"{r[k]:.0f}" for k in ("end_rss_anon_mib", "end_rss_file_mib")),
            *(f"{r[k]:.2f}" for k in ("load_s", "train_s", "eval_s")),
            f"{r['eval_loss']:.5f}",
        )
    Console(width=max(130, Console().width)).print(t)


if __name__ == "__main__":
    main()
