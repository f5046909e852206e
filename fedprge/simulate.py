"""``python -m fedprge.simulate``: a federation of virtual clients on Flower's simulation engine (Ray).

Examples::

    python -m fedprge.simulate --clients 50
    python -m fedprge.simulate --config configs/smoke.yaml federation.downlink=weights zo.q=8
    python -m fedprge.simulate --clients 200 --ray-address 127.0.0.1:6379
    python -m fedprge.simulate --resume runs/smoke-20260101-120000   # continue a killed run
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from fedprge.config import RunConfig, load_config
from fedprge.results import RunWriter

PROG = "python -m fedprge.simulate"


def backend_config(cfg: RunConfig) -> dict:
    init_args: dict = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.sim.ray_address:
        init_args["address"] = cfg.sim.ray_address
    else:  # a Ray of our own, even when a `ray start` session is the machine's current cluster
        init_args["address"], init_args["num_cpus"] = "local", cfg.sim.cpus
    return {
        "client_resources": {"num_cpus": cfg.sim.cpus_per_client, "num_gpus": cfg.sim.gpus_per_client},
        "init_args": init_args,
    }


def check_inputs(cfg: RunConfig) -> None:
    """What validation of the config alone cannot see, checked before anything starts (ValueError or OSError):
    the model resolves, the data set loads, every LoRA target names linear layers of the model. Also fills the
    model and data caches before the workers start."""
    from fedprge.engine.adapters import LoRAFA
    from fedprge.models import prefetch, skeleton
    from fedprge.task import load_data

    if cfg.model.device == "cuda" and cfg.sim.gpus_per_client <= 0:
        raise ValueError(
            "model.device='cuda' needs a GPU share per simulated client: set sim.gpus_per_client (e.g. 0.25)"
        )
    if not cfg.sim.ray_address:  # a cluster's nodes may have the GPUs this driver lacks
        from fedprge.engine.backend import check_device

        check_device(cfg.model.device)
    prefetch(cfg.model.name)
    load_data(cfg)
    LoRAFA(skeleton(cfg.model.name), cfg.lora_config())  # on the model's weightless skeleton


def _not_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """False for Flower's warning that ``run_simulation`` is deprecated (see :func:`simulate`)."""
    return not record.getMessage().startswith("DEPRECATED FEATURE: The `run_simulation` function is deprecated")


def simulate(cfg: RunConfig, writer: RunWriter | None = None, resume: bool = False) -> dict:
    """Run one simulation in this process and return its summary (``resume``: continue ``writer.dir``)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["OMP_NUM_THREADS"] = str(cfg.sim.cpus_per_client)
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    # flwr 1.42 deprecates run_simulation in favour of `flwr run`, which starts the apps in processes of its own
    # from a packaged project: a ServerApp that writes into this process's RunWriter has no other in-process
    # runner, so the warning (printed twice, by Flower's handler and the root logger) is dropped. README "flwr run".
    logging.getLogger("flwr").addFilter(_not_run_simulation_deprecation)

    from fedprge.federation.client_app import app as client_app
    from fedprge.federation.server_app import make_server_app

    check_inputs(cfg)
    writer = writer or RunWriter(cfg)
    outcome: dict = {}
    if cfg.federation.algorithm == "prge":
        server_app, clients = make_server_app(cfg, writer, outcome, resume=resume), client_app
    else:  # a first-order FedAvg baseline (fedprge.federation.fedavg), for comparisons
        from fedprge.federation import fedavg

        server_app, clients = fedavg.make_server_app(cfg, writer, outcome), fedavg.make_client_app(cfg)
    run_simulation(
        server_app=server_app,
        client_app=clients,
        num_supernodes=cfg.federation.clients,
        backend_config=backend_config(cfg),
    )
    if "error" in outcome:
        raise RuntimeError(f"the federation failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError(f"the simulation ended without a result; see the log above and {writer.dir}")
    if cfg.export.adapters and cfg.federation.algorithm == "prge":
        from fedprge.export.peft_adapters import export_run

        done = export_run(writer.dir)  # RUN/adapters/global: a standard PEFT adapter of the global B
        logging.getLogger("fedprge").info("PEFT adapter of the global B: %s", done.adapters["global"])
    return outcome["summary"]


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, bool, str | None]:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", action="append", default=[], help="YAML file(s) merged onto the defaults, in order")
    p.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    p.add_argument("--rounds", type=int, help="federation.rounds")
    p.add_argument("--model", help="tiny, smollm2 or a local Hugging Face model folder (model.name)")
    p.add_argument("--task", help="shakespeare, tweets or a .jsonl file (data.task)")
    p.add_argument("--ray-address", help="attach to a running Ray cluster, e.g. 127.0.0.1:6379")
    p.add_argument("--out", help="results folder (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt (its config.yaml; overrides may only change "
        "name, out_dir, sim.*, federation.stop_after/checkpoint/setup_timeout_s)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. zo.q=8 federation.downlink=pool")
    a = p.parse_intermixed_args(argv)
    over = list(a.overrides)
    for flag, key in (
        ("clients", "federation.clients"),
        ("rounds", "federation.rounds"),
        ("model", "model.name"),
        ("task", "data.task"),
        ("ray_address", "sim.ray_address"),
        ("out", "out_dir"),
    ):
        if getattr(a, flag) is not None:
            over.append(f"{key}={getattr(a, flag)}")
    files = [Path(a.resume) / "config.yaml", *a.config] if a.resume else a.config
    try:
        cfg = load_config(files, over)
        if a.resume:
            from fedprge.federation import checkpoint

            checkpoint.check_compatible(checkpoint.load(Path(a.resume) / checkpoint.NAME)["config"], cfg)
    except (ValueError, FileNotFoundError) as e:
        _bad_input(e)
    return cfg, a.no_progress, a.resume


def _bad_input(e: Exception) -> NoReturn:
    """Exit with one line on stderr naming the bad value (no usage text, no traceback)."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "ray", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg, no_progress, resume = parse_args(argv)
    try:
        check_inputs(cfg)  # before the results folder and Ray; simulate() checks again, from warm caches
    except (ValueError, OSError) as e:
        _bad_input(e)
    try:
        simulate(cfg, RunWriter(cfg, out=resume, progress=not no_progress), resume=resume is not None)
    except RuntimeError as e:
        from fedprge.federation.server_app import RunStopped

        if not isinstance(e.__cause__, RunStopped):
            raise
        return 3  # stopped on purpose (federation.stop_after); the server logged how to resume
    return 0


if __name__ == "__main__":
    sys.exit(main())
