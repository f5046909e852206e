"""Native clients in a local fleet: ``clients/fleet.py --native N`` starts ``fedprge-client`` for partitions
0..N-1 next to Python SuperNodes for the others, against one SuperLink (plain HTTP, or TLS with SuperNode auth).

For each native node this module exports the partition's data file (``client_data.py``), makes its key pair when
the fleet authenticates nodes (a PEM private key for the client, the OpenSSH public key registered with
``flwr supernode register``), and starts the binary with its state file in ``<work>/native-<i>/``. The native
clients run the fleet's ``.pte``, so ``--native`` needs ExecuTorch clients (``--pte`` or ``--client executorch``).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BIN = HERE / "build" / "fedprge-client"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--native", type=int, default=0, metavar="N", help="run partitions 0..N-1 as native C++ clients")
    p.add_argument(
        "--native-bin",
        default=str(DEFAULT_BIN),
        help=f"the fedprge-client binary (default: {DEFAULT_BIN}; build it with clients/native/build.sh)",
    )


def check(args: argparse.Namespace, cfg, nodes: int) -> str | None:
    """Why ``--native`` cannot run with these settings (None: it can)."""
    if not args.native:
        return None
    if not 0 < args.native <= nodes:
        return f"--native {args.native} is invalid; it must be in [1, --nodes={nodes}]"
    if cfg.client.backend != "executorch" or not cfg.client.pte:
        return "--native needs the clients' .pte: pass --pte PROGRAM.pte or --client executorch"
    if not Path(args.native_bin).is_file():
        return f"--native-bin {args.native_bin} does not exist; build it with: clients/native/build.sh"
    return None


def pem_keys(folder: Path, i: int) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair for native node ``i``: (PEM private key, OpenSSH public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"native-{i}.pem", folder / f"native-{i}.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    private.write_bytes(pem)
    private.chmod(0o600)
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(openssh)
    return private, public


def node_command(
    binary: str, address: str, ca: Path | None, key: Path | None, pte: str, data: Path, state: Path
) -> list[str]:
    """The ``fedprge-client`` command line of one native node."""
    cmd = [binary, "--superlink", address, "--pte", pte, "--data", str(data), "--state", str(state)]
    cmd += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if key is not None:
        cmd += ["--auth-key", str(key)]
    return cmd


def start(fleet, i: int, cfg, binary: str, host: str) -> None:
    """Export partition ``i``'s data, register its key if the fleet authenticates nodes, start its client."""
    from clients.native.client_data import write

    folder = fleet.work / f"native-{i}"
    data = write(cfg, i, folder / "data.json")
    key = None
    if fleet.auth:
        key, public = pem_keys(fleet.work / "keys", i)
        fleet.register_node(public)
    ca = fleet.certs.ca if fleet.certs else None
    cmd = node_command(binary, f"{host}:{fleet.port}", ca, key, str(cfg.client.pte), data, folder / "state.bin")
    (folder / "command").write_text(shlex.join(cmd) + "\n")
    fleet._spawn(f"native-{i}", cmd)
