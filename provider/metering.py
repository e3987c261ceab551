"""Metering: what a task used, measured from outside the sandbox (the task cannot lie about it).

CPU seconds count the task process and its reaped children; peak memory is the largest resident
set seen across samples. The per-task path reads only the process itself (two /proc reads); the
whole process tree, which needs a scan of /proc, is sampled on heartbeats only. Usage is
cumulative from the task's start, which is what the gateway settles on (idempotently).
"""

from __future__ import annotations

import contextlib
import time

import psutil


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _own_rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def _tree_rss(proc: psutil.Process) -> int:
    rss = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            rss += child.memory_info().rss
    return rss


class Meter:
    """Cumulative usage of one task on one worker process."""

    def __init__(self, proc: psutil.Process, gpus: float = 0.0) -> None:
        self.proc = proc
        self.gpus = gpus  # GPUs allocated to the task: billed for its wall time, as clouds do
        self.wall0 = time.monotonic()
        self.cpu0 = self._safe(_cpu, 0.0)
        self.cpu = 0.0
        self.max_rss = 0
        self.gib_seconds = 0.0
        self._last = (self.wall0, 0)

    def _safe(self, fn, default):  # the process may die at any moment (cancel, limits)
        try:
            return fn(self.proc)
        except psutil.Error:
            return default

    def sample(self, tree: bool = False) -> dict[str, float]:
        """Take a sample (of the whole process tree if ``tree``); return cumulative usage."""
        cpu = self._safe(_cpu, None)
        if cpu is not None:
            self.cpu = max(self.cpu, cpu - self.cpu0)
        rss = self._safe(_tree_rss if tree else _own_rss, 0)
        self.max_rss = max(self.max_rss, rss)
        now = time.monotonic()
        last_t, last_rss = self._last
        self.gib_seconds += (now - last_t) * max(rss, last_rss) / 2**30  # upper step estimate
        self._last = (now, rss)
        return self.usage()

    def usage(self) -> dict[str, float]:
        return {
            "cpu_seconds": round(self.cpu, 6),
            "wall_seconds": round(time.monotonic() - self.wall0, 6),
            "max_rss_bytes": float(self.max_rss),
            "memory_gib_seconds": round(self.gib_seconds, 6),
            "gpu_seconds": round(self.gpus * (time.monotonic() - self.wall0), 6),
        }
