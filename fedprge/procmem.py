"""Memory of processes from /proc/PID/status: one field of one process, and the peak of a run's processes (this one
and the Ray worker processes it started: simulated clients)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path


def status_kib(field: str, pid: int | str = "self") -> int:
    """One memory field of /proc/PID/status in KiB: ``VmRSS`` (resident now), ``VmHWM`` (peak resident),
    ``RssAnon`` (private), ``RssFile`` (file-backed). Raises ``KeyError`` when the kernel has no such field."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def status_mib(field: str, pid: int | str = "self") -> float:
    """:func:`status_kib` in MiB."""
    return status_kib(field, pid) / 1024


def reset_peak(pid: int | str = "self") -> None:
    """Reset a process's VmHWM (peak RSS) to its current RSS, so the next read is the peak since now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_bytes(pid: int) -> int:
    """VmHWM (the kernel's peak resident set) of a process, 0 if it is gone or unreadable."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return status_kib("VmHWM", pid) * 1024
    return 0


class PeakMemory:
    """Samples, in a background thread, the summed RSS of this process tree and each Ray worker's peak RSS.

    ``worker_peak``: the largest peak RSS of any descendant whose title starts with ``ray::`` (a Ray worker: on
    a simulation, the client process with its model), 0 when there was none (e.g. an external Ray cluster).
    ``total_peak``: the largest sum of RSS over this process and all its descendants seen by a sample.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.worker_peak = 0
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a process that just exited
                total += p.memory_info().rss
                if p.pid != me.pid and " ".join(p.cmdline()).startswith("ray::"):
                    self.worker_peak = max(self.worker_peak, _peak_rss_bytes(p.pid))
        self.total_peak = max(self.total_peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
