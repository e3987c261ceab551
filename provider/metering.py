"""Metering: what a task used, measured from outside the sandbox (the task cannot lie about it).

CPU seconds count every process the task started, whatever became of it: with a cgroup per worker
(see `provider.sandbox`) they are the cgroup's `cpu.stat` total, which keeps the CPU of processes
that already ended, double-forked daemons included; without one, the worker's own `/proc/PID/stat`
(itself and the children it reaped; in a PID namespace also the orphans its init reaped) plus, on
heartbeats, every live process below it (or its init). With neither, a daemon that left the
worker's tree is killed when its task ends (per-task uid) but its CPU is not metered. Peak
memory is the largest resident set seen across samples. The per-task path is a few small file
reads, never a scan of /proc; the whole process tree is sampled on heartbeats only. Usage is
cumulative from the task's start, which is what the gateway settles on (idempotently).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import psutil

from provider.sandbox import cgroup_of, cgroup_pids, namespace_init

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
T = TypeVar("T")


def read_stat(pid: int) -> tuple[float, int]:
    """``(CPU seconds of the process and its reaped children, resident bytes)`` of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # the name may contain spaces and ")"
    # After the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
    cpu = sum(int(x) for x in fields[11:15]) / _TICKS
    return cpu, int(fields[21]) * _PAGE


def cgroup_cpu(path: str) -> float:
    """CPU seconds used by every process that ever ran in the cgroup."""
    with open(os.path.join(path, "cpu.stat")) as f:
        for line in f:
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
    raise OSError(f"no usage_usec in {path}/cpu.stat")


def _tree_stats(pids: Iterable[int]) -> tuple[float, int]:
    cpu, rss = 0.0, 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):  # it may end at any moment
            c, r = read_stat(pid)
            cpu, rss = cpu + c, rss + r
    return cpu, rss


class Meter:
    """Cumulative usage of one task on one worker process (and everything it started)."""

    def __init__(self, proc: psutil.Process, gpus: float = 0.0,
                 cgroup: str | None = None) -> None:
        self.proc = proc
        self.gpus = gpus  # GPUs allocated to the task: billed for its wall time, as clouds do
        self.cgroup = cgroup if cgroup is not None else cgroup_of(proc.pid)
        # Without a cgroup, a PID namespace's init reaps what left the worker's tree: count it.
        self.init = namespace_init(proc.pid) if self.cgroup is None else None
        self.wall0 = time.monotonic()
        self.cpu0 = self._safe(self._cpu, 0.0)
        self.cpu = 0.0
        self.max_rss = 0
        self.gib_seconds = 0.0
        self._last = (self.wall0, 0)

    def _safe(self, fn: Callable[[], T], default: T) -> T:
        try:  # the process may die at any moment (cancel, limits)
            return fn()
        except (OSError, ValueError, IndexError, psutil.Error):
            return default

    def _descendants(self) -> list[int]:
        if self.cgroup is not None:
            return [pid for pid in cgroup_pids(self.cgroup) if pid != self.proc.pid]
        top = psutil.Process(self.init) if self.init is not None else self.proc
        return [child.pid for child in top.children(recursive=True) if child.pid != self.proc.pid]

    def _cpu(self, tree: bool = False) -> float:
        if self.cgroup is not None:
            return cgroup_cpu(self.cgroup)
        own = read_stat(self.proc.pid)[0]
        if self.init is not None:  # orphans the init reaped (its own share is a constant ~0)
            own += read_stat(self.init)[0]
        # A live descendant's reaped children are in its own cutime: nothing counted twice.
        return own + (_tree_stats(self._descendants())[0] if tree else 0.0)

    def _rss(self, tree: bool) -> int:
        own = read_stat(self.proc.pid)[1]
        return own + (_tree_stats(self._descendants())[1] if tree else 0)

    def sample(self, tree: bool = False) -> dict[str, float]:
        """Take a sample (of the whole process tree if ``tree``); return cumulative usage."""
        cpu = self._safe(lambda: self._cpu(tree), None)
        if cpu is not None:
            self.cpu = max(self.cpu, cpu - self.cpu0)
        rss = self._safe(lambda: self._rss(tree), 0)
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
