"""Metering: what a task used, measured from outside the sandbox (the task cannot lie about it).

CPU seconds count every process the task started, whatever became of it: with a cgroup per worker
(see `provider.sandbox`) they are the cgroup's `cpu.stat` total, which keeps the CPU of processes
that already ended, double-forked daemons included; without one, the worker's own `/proc/PID/stat`
(itself and the children it reaped; in a PID namespace also the orphans its init reaped) plus, on
heartbeats, every live process below it (or its init). With neither, a daemon that left the
worker's tree is killed when its task ends (per-task uid) but its CPU is not metered. Peak
memory is the largest resident set seen across samples. The per-task path is two or three
``pread`` calls on files each worker keeps open (:class:`Probe`), never a scan of /proc nor a path
lookup; the whole process tree is sampled on heartbeats only. Usage is cumulative from the task's
start, which is what the gateway settles on (idempotently).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import psutil

from provider.sandbox import cgroup_of, cgroup_pids, namespace_init

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
T = TypeVar("T")


def _fields(stat: bytes) -> list[bytes]:
    return stat.rsplit(b")", 1)[1].split()  # the name may contain spaces and ")"


def _stat_values(stat: bytes) -> tuple[float, int]:
    # After the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
    fields = _fields(stat)
    return sum(int(x) for x in fields[11:15]) / _TICKS, int(fields[21]) * _PAGE


def read_stat(pid: int) -> tuple[float, int]:
    """``(CPU seconds of the process and its reaped children, resident bytes)`` of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return _stat_values(f.read())


def _usage_usec(text: bytes, where: str) -> float:
    for line in text.splitlines():
        if line.startswith(b"usage_usec"):
            return int(line.split()[1]) / 1e6
    raise OSError(f"no usage_usec in {where}")


def cgroup_cpu(path: str) -> float:
    """CPU seconds used by every process that ever ran in the cgroup."""
    with open(os.path.join(path, "cpu.stat"), "rb") as f:
        return _usage_usec(f.read(), f"{path}/cpu.stat")


def _tree_stats(pids: Iterable[int]) -> tuple[float, int]:
    cpu, rss = 0.0, 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):  # it may end at any moment
            c, r = read_stat(pid)
            cpu, rss = cpu + c, rss + r
    return cpu, rss


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Probe:
    """The counters of one worker process, opened once for its whole life (one ``pread`` each
    per sample instead of a path lookup, an open and a close; the per-task path is 2-3 reads).

    A descriptor of ``/proc/PID/...`` stays bound to that process: once it has ended, reads fail
    (ESRCH) instead of reading a newer process that reused the PID. The cgroup and the PID
    namespace's init are found once: a worker never changes either (the task cannot write to
    ``cgroup.procs``; the init is the worker's parent for its whole life).
    """

    def __init__(self, pid: int, cgroup: str | None) -> None:
        self.pid = pid
        self.cgroup = cgroup
        # Without a cgroup, a PID namespace's init reaps what left the worker's tree: count it.
        self.init = namespace_init(pid) if cgroup is None else None
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        try:
            self.stat = self._open(f"/proc/{pid}/stat")
            self.statm = self._open(f"/proc/{pid}/statm")
            self.cpu_stat = self._open(os.path.join(cgroup, "cpu.stat")) if cgroup else None
            self.init_stat = self._open(f"/proc/{self.init}/stat") if self.init else None
        except OSError:
            self.close()
            raise

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def cpu(self) -> float:
        """CPU seconds of the task's processes that are counted without a tree scan."""
        if self.cpu_stat is not None:
            return _usage_usec(os.pread(self.cpu_stat, 4096, 0), f"{self.cgroup}/cpu.stat")
        own = _stat_values(os.pread(self.stat, 4096, 0))[0]
        if self.init_stat is not None:  # orphans the init reaped (its own share is ~0)
            own += _stat_values(os.pread(self.init_stat, 4096, 0))[0]
        return own

    def rss(self) -> int:
        """Resident bytes of the worker process itself."""
        data = os.pread(self.statm, 256, 0)
        if not data:
            raise OSError(f"process {self.pid} has ended")
        return int(data.split()[1]) * _PAGE

    def close(self) -> None:
        self._finalizer()


def process_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the process itself and the children it reaped (its lifetime CPU limit
    counts these), read through its kept-open probe."""
    return _stat_values(os.pread(probe_of(proc).stat, 4096, 0))[0]


#: One probe per live worker process (psutil.Process hashes by PID *and* start time), closed when
#: the worker's Process object is gone.
_PROBES: weakref.WeakKeyDictionary[psutil.Process, Probe] = weakref.WeakKeyDictionary()


def probe_of(proc: psutil.Process, cgroup: str | None = None) -> Probe:
    """The kept-open probe of ``proc`` (made on first use; ``cgroup`` None: found from /proc)."""
    probe = _PROBES.get(proc)
    if probe is None or (cgroup is not None and probe.cgroup != cgroup):
        probe = Probe(proc.pid, cgroup if cgroup is not None else cgroup_of(proc.pid))
        _PROBES[proc] = probe
    return probe


class Meter:
    """Cumulative usage of one task on one worker process (and everything it started)."""

    def __init__(self, proc: psutil.Process, gpus: float = 0.0,
                 cgroup: str | None = None) -> None:
        self.proc = proc
        self.gpus = gpus  # GPUs allocated to the task: billed for its wall time, as clouds do
        self.probe = self._safe(lambda: probe_of(proc, cgroup), None)
        if self.probe is not None:
            self.cgroup, self.init = self.probe.cgroup, self.probe.init
        else:  # gone already: every sample reads as nothing new
            self.cgroup = cgroup if cgroup is not None else cgroup_of(proc.pid)
            self.init = namespace_init(proc.pid) if self.cgroup is None else None
        self.wall0 = time.monotonic()
        self.cpu0 = self._safe(self._cpu, 0.0)
        self.cpu = 0.0
        self.max_rss = 0
        self.rss = 0  # resident bytes at the last sample (of the whole tree on heartbeats)
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
        if self.probe is None:
            raise OSError(f"process {self.proc.pid} could not be metered")
        own = self.probe.cpu()  # with a cgroup: everything that ever ran in it
        if self.cgroup is not None or not tree:
            return own
        # A live descendant's reaped children are in its own cutime: nothing counted twice.
        return own + _tree_stats(self._descendants())[0]

    def _rss(self, tree: bool) -> int:
        if self.probe is None:
            raise OSError(f"process {self.proc.pid} could not be metered")
        own = self.probe.rss()
        return own + (_tree_stats(self._descendants())[1] if tree else 0)

    def sample(self, tree: bool = False) -> dict[str, float]:
        """Take a sample (of the whole process tree if ``tree``); return cumulative usage."""
        cpu = self._safe(lambda: self._cpu(tree), None)
        if cpu is not None:
            self.cpu = max(self.cpu, cpu - self.cpu0)
        rss = self._safe(lambda: self._rss(tree), 0)
        self.rss = rss
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
