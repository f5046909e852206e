"""A local fleet: one ``flower-superlink``, N ``flower-supernode`` processes on 127.0.0.1, one run, then stop all.

Examples (from the repository root)::

    python clients/fleet.py --insecure --config configs/smoke.yaml              # eager clients, plain HTTP
    python clients/fleet.py --tls certs --client executorch --config configs/smoke.yaml
    python clients/fleet.py --tls certs --auth --pte tiny.pte --nodes 4 federation.rounds=5
    python clients/fleet.py --tls certs --auth --pte tiny.pte --native 2 --config configs/smoke.yaml  # 2 C++ clients
    python clients/fleet.py --insecure --resume runs/smoke-20260101-120000     # continue a killed run

SuperNode i gets ``--node-config "partition-id=i num-partitions=N"`` (and ``pte="..."`` for ExecuTorch clients,
which then load only that program and a tokenizer). The federation runs with ``flwr run <repo> fleet --stream``
from a private ``FLWR_HOME`` whose ``config.toml`` names this SuperLink; the resolved fedprge config travels as
the run config's ``config`` key, so the ServerApp runs exactly it, and the results land in
``--out`` (default ``runs/``, relative to where this command runs) as ``<name>-<timestamp>/``.

Transport security is explicit: ``--tls DIR`` creates (once) a self-signed CA and a server certificate for
127.0.0.1/localhost in DIR and uses them everywhere; ``--insecure`` runs plain HTTP. ``--auth`` (needs ``--tls``)
turns on SuperNode authentication: the SuperLink starts with ``--enable-supernode-auth``, every SuperNode gets an
EC key pair, and its public key is registered with ``flwr supernode register`` before the node starts.

``--resume RUN_DIR`` continues a run whose SuperLink (or whole fleet) died from the ``checkpoint.pt`` in RUN_DIR
(written after every round), on a new SuperLink and new SuperNodes: the ServerApp restores the state as
``python -m fedprge.simulate --resume`` does (same config; see README "Checkpoint and resume").

Logs, pid files, keys and the Flower home go to ``--work`` (default: a new temporary folder, kept and printed).
Every process is stopped at the end, on failure, on Ctrl-C and on SIGTERM; if the SuperLink exits during the run,
so does the fleet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONNECTION = "fleet"
HOST = "127.0.0.1"


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def ensure_certificates(folder: Path) -> Certificates:
    """A self-signed CA and a server certificate for 127.0.0.1, ::1 and localhost in ``folder`` (made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    certs = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    if certs.ca.exists() and certs.cert.exists() and certs.key.exists():
        return certs
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=365),
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprge fleet CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(), **valid)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in (HOST, "::1")]
    names = [x509.DNSName("localhost"), *ips]
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            **valid,
        )
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.cert.write_bytes(cert.public_bytes(pem))
    certs.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    certs.key.chmod(0o600)
    return certs


def node_keys(folder: Path, i: int) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair in OpenSSH format for SuperNode ``i``: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"supernode-{i}", folder / f"supernode-{i}.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    enc = serialization.Encoding.OpenSSH
    fmt = serialization.PrivateFormat.OpenSSH
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(enc, serialization.PublicFormat.OpenSSH))
    return private, public


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Fleet:
    """The processes of one local federation; :meth:`stop` ends every one of them (and their children)."""

    def __init__(self, work: Path, certs: Certificates | None, auth: bool = False, port: int | None = None) -> None:
        self.work = work
        self.certs = certs
        self.auth = auth
        self.port = port or free_port()
        self.home = work / "flwr-home"
        self.logs = work / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{certs.ca}"' if certs else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.port}"\n{tls}\n'
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else Flower uv-syncs the app (a CUDA torch)
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # pick up each message's ClientApp 0.8 s sooner
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec by name
        }

    def _tls_server(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        c = self.certs
        return ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.cert), "--ssl-keyfile", str(c.key)]

    def _tls_client(self) -> list[str]:
        return ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs.ca)]

    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd, start_new_session=True
        )
        log.close()
        (self.work / f"{name}.pid").write_text(f"{proc.pid}\n")
        (self.logs / f"{name}.cmd").write_text(shlex.join(cmd) + "\n")
        self.procs[name] = proc
        return proc

    def start_superlink(self, cwd: Path, timeout_s: float = 60.0) -> None:
        """Start the SuperLink (its ServerApp inherits ``cwd``) and wait until its port accepts connections."""
        cmd = [str(BIN / "flower-superlink"), *self._tls_server(), "--host", HOST, "--port", str(self.port)]
        cmd += ["--disable-runtime-dependency-installation"]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        proc = self._spawn("superlink", cmd, cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {proc.returncode}:\n{tail(self.logs / 'superlink.log')}"
                )
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not listen on {HOST}:{self.port} within {timeout_s:.0f} s")

    def register_node(self, public_key: Path) -> None:
        """``flwr supernode register``: allow the SuperNode holding the matching private key to connect."""
        cmd = [str(BIN / "flwr"), "supernode", "register", str(public_key), CONNECTION]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")

    def start_supernode(self, i: int, num: int, extra: dict[str, str] | None = None) -> None:
        """SuperNode for partition ``i`` of ``num``, with extra node-config string values (e.g. ``pte``)."""
        node_config = f"partition-id={i} num-partitions={num}"
        for k, v in (extra or {}).items():
            node_config += f" {k}={json.dumps(str(v))}"
        cmd = [str(BIN / "flower-supernode"), *self._tls_client(), "--superlink", f"{HOST}:{self.port}"]
        cmd += ["--host", HOST, "--port", str(free_port()), "--node-config", node_config]
        if self.auth:
            private, public = node_keys(self.work / "keys", i)
            self.register_node(public)
            cmd += ["--auth-supernode-private-key", str(private)]
        self._spawn(f"supernode-{i}", cmd)

    def run(self, app: Path, run_config: Path, timeout_s: float) -> int:
        """``flwr run`` one federation and stream its log to this process's stdout; returns its exit code."""
        cmd = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        self.procs["flwr-run"] = proc
        deadline = time.monotonic() + timeout_s
        while (code := proc.poll()) is None:
            self._check_superlink()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the run did not finish within --timeout {timeout_s:.0f} s")
            time.sleep(0.5)
        if code != 0:  # `flwr run` may notice a dead SuperLink before this loop does: name the cause, not the symptom
            self._check_superlink(wait_s=2.0)
        return code

    def _check_superlink(self, wait_s: float = 0.0) -> None:
        """Raise if the SuperLink has exited (waiting up to ``wait_s`` for it to)."""
        link = self.procs.get("superlink")
        if link is None:
            return
        if wait_s:
            with contextlib.suppress(subprocess.TimeoutExpired):
                link.wait(timeout=wait_s)
        if link.poll() is not None:
            raise RuntimeError(f"the SuperLink exited during the run: {', '.join(self.dead())}")

    def dead(self) -> list[str]:
        """The fleet's SuperLink/SuperNodes that have exited, as ``name (exit code or signal)``."""
        out = []
        for name, p in self.procs.items():
            if name != "flwr-run" and p.poll() is not None:
                how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
                out.append(f"{name} ({how})")
        return out

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group (and any descendant that left it), then SIGKILL what is left."""
        children = _descendants([p.pid for p in self.procs.values()])
        order = sorted(self.procs.items(), key=lambda kv: kv[0] == "superlink")  # nodes first, the link last
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, p in order:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)  # the group outlives its leader: no poll() check
            for c in children:
                with contextlib.suppress(Exception):
                    c.send_signal(sig)
            deadline = time.monotonic() + grace_s
            for _, p in order:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if all(p.poll() is not None for p in self.procs.values()) and not any(_alive(c) for c in children):
                return


def _descendants(pids: list[int]) -> list:
    try:
        import psutil
    except ImportError:  # pragma: no cover (psutil comes with ray)
        return []
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out += psutil.Process(pid).children(recursive=True)
    return out


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python clients/fleet.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--config", action="append", default=[], help="YAML file(s) merged onto the defaults, in order")
    p.add_argument("--nodes", type=int, help="SuperNodes to start (partitions 0..N-1; default federation.clients)")
    p.add_argument("--client", choices=("eager", "executorch"), help="client backend (default: client.backend)")
    p.add_argument("--pte", help="ExecuTorch program for the clients (implies --client executorch)")
    p.add_argument(
        "--pte-backend", choices=("xnnpack", "portable"), default="xnnpack", help="when the .pte is exported here"
    )
    sec = p.add_mutually_exclusive_group()
    sec.add_argument("--tls", metavar="DIR", help="TLS with a self-signed CA in DIR (created if missing)")
    sec.add_argument("--insecure", action="store_true", help="plain HTTP (no TLS): only for loopback experiments")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    p.add_argument("--port", type=int, help="SuperLink port (default: a free one)")
    p.add_argument("--out", help="results folder (default: out_dir of the config, relative to the current folder)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt (its config.yaml; --config and overrides may only "
        "change name, out_dir, sim.*, federation.stop_after/checkpoint/setup_timeout_s)",
    )
    p.add_argument("--work", help="folder for logs, pid files, keys and FLWR_HOME (default: a new temporary one)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the whole run is stopped")
    p.add_argument("overrides", nargs="*", help="dotted fedprge config overrides, e.g. federation.rounds=5")
    native().add_arguments(p)
    return p


def resolve(args: argparse.Namespace, work: Path, p: argparse.ArgumentParser):
    """The run's config (absolute out_dir and .pte) and the number of nodes; exports a .pte if needed."""
    from fedprge.config import ClientSection, load_config
    from fedprge.config_rules import validate
    from fedprge.federation import checkpoint

    run = Path(args.resume).expanduser().resolve() if args.resume else None
    try:
        cfg = load_config([run / "config.yaml", *args.config] if run else args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    cfg.out_dir = str(run.parent if run else Path(args.out or cfg.out_dir).expanduser().resolve())
    nodes = args.nodes or cfg.federation.clients
    if not 1 <= nodes <= cfg.federation.clients:
        p.error(f"--nodes {nodes} is invalid; it must be in [1, federation.clients={cfg.federation.clients}]")
    backend = "executorch" if args.pte else (args.client or cfg.client.backend)
    pte = args.pte or (cfg.client.pte if backend == "executorch" else None)
    if backend == "executorch":
        from fedprge.export.backend import check_spec, export_args, read_spec

        if pte is None:
            pte = str(work / f"program-{args.pte_backend}.pte")
            cmd = [sys.executable, "-m", "fedprge.export", *export_args(cfg), "--backend", args.pte_backend]
            print(f"exporting the clients' program: {shlex.join(['python', *cmd[1:]])} --out {pte}", flush=True)
            res = subprocess.run([*cmd, "--out", pte], capture_output=True, text=True)
            if res.returncode != 0:
                p.exit(1, f"fleet: the export failed ({res.returncode}):\n{res.stderr[-3000:]}\n")
            print(res.stdout.strip().splitlines()[-1], flush=True)
        pte = str(Path(pte).expanduser().resolve())
        try:
            check_spec(cfg, read_spec(pte), pte)
        except ValueError as e:
            p.error(str(e))
    cfg.client = ClientSection(backend, pte)
    cfg = validate(cfg)
    if run:
        try:
            checkpoint.check_compatible(checkpoint.load(run / checkpoint.NAME)["config"], cfg)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    return cfg, nodes


def summary_time(run: Path) -> int | None:
    """When the run folder's summary.json was written (None: not yet)."""
    with contextlib.suppress(OSError):
        return (run / "summary.json").stat().st_mtime_ns
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not (args.tls or args.insecure):
        p.error("choose --tls DIR (self-signed certificates, made if missing) or, knowingly, --insecure")
    if args.auth and not args.tls:
        p.error("--auth needs --tls: Flower only authenticates SuperNodes over TLS")
    if args.resume and args.out:
        p.error("--out does not go with --resume: the results stay in the resumed run folder")
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="fedprge-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, nodes = resolve(args, work, p)
    if why := native().check(args, cfg, nodes):
        p.error(why)
    from fedprge.config import to_yaml

    run_toml = work / "run.toml"
    resume = str(Path(args.resume).resolve()) if args.resume else ""
    # a JSON string is a valid TOML basic string
    run_toml.write_text(f"config = {json.dumps(to_yaml(cfg))}\nresume = {json.dumps(resume)}\n")
    out = Path(cfg.out_dir)

    before = {d: summary_time(d) for d in ([Path(resume)] if resume else out.glob(f"{cfg.name}-*"))}

    def runs() -> list[Path]:
        """This run's folder: the resumed one, or the new ones named after the config."""
        return [Path(resume)] if resume else sorted(set(out.glob(f"{cfg.name}-*")) - set(before))

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    certs = ensure_certificates(Path(args.tls).expanduser().resolve()) if args.tls else None
    fleet = Fleet(work, certs, auth=args.auth, port=args.port)
    security = "TLS" + (" + SuperNode auth" if args.auth else "") if certs else "INSECURE plain HTTP"
    print(
        f"fleet: SuperLink {HOST}:{fleet.port} ({security}), {nodes} SuperNodes ({cfg.client.backend} clients"
        + (f", {cfg.client.pte}" if cfg.client.pte else "")
        + (f"; {args.native} of them native" if args.native else "")
        + f"); logs in {fleet.logs}",
        flush=True,
    )
    try:
        fleet.start_superlink(cwd=Path.cwd())
        extra = {"pte": cfg.client.pte} if cfg.client.backend == "executorch" else {}
        for i in range(nodes):
            if i < args.native:  # partitions 0..N-1: native C++ clients (clients/native/launch.py)
                native().start(fleet, i, cfg, args.native_bin, HOST)
            else:
                fleet.start_supernode(i, cfg.federation.clients, extra)
        code = fleet.run(REPO, run_toml, args.timeout)
        done = [d for d in runs() if summary_time(d) not in (None, before.get(d))]
        if dead := fleet.dead():
            print(f"fleet: exited during the run: {', '.join(dead)}; their logs are in {fleet.logs}", file=sys.stderr)
        if code != 0 or not done:
            print(
                f"fleet: the run failed (flwr run exit code {code}); see the log above and {fleet.logs}",
                file=sys.stderr,
            )
            resume_hint(args, runs())
            return 1
        print(f"fleet: results in {done[-1]}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("fleet: interrupted; stopping every process", file=sys.stderr)
        resume_hint(args, runs())
        return 130
    except RuntimeError as e:
        print(f"fleet: {e}", file=sys.stderr)
        resume_hint(args, runs())
        return 1
    finally:
        fleet.stop()


def resume_hint(args: argparse.Namespace, runs: list[Path]) -> None:
    """Say how to continue the run, if it checkpointed a round."""
    if saved := [d for d in runs if (d / "checkpoint.pt").exists()]:
        security = f"--tls {args.tls}" + (" --auth" if args.auth else "") if args.tls else "--insecure"
        print(
            f"fleet: continue with: python clients/fleet.py {security} --resume {saved[-1]} "
            "(with the same --nodes and client options)",
            file=sys.stderr,
        )


def native():
    """``clients/native/launch.py``: native clients in the fleet (imported by path: this file also runs as a script)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from clients.native import launch

    return launch


if __name__ == "__main__":
    sys.exit(main())
