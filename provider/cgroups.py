"""The cgroup (v2) each worker of a root provider gets: created, swept, listed and killed here.

Split out of `provider.sandbox` because the cgroup is its own concept: a cgroup lets the pool see
every process a task started (`cgroup_pids`), kill them all at once (`kill_cgroup`, also what
setsid() escapes a process group with) and meter their CPU (`provider.metering`, via `cgroup_of`).
Worker cgroups are named after the provider's pid, so a provider that starts sweeps the ones its
dead predecessors left behind.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import subprocess
import threading
from functools import cache

from provider.child_setup import _preexec

log = logging.getLogger(__name__)

_PROBE_TIMEOUT = 5.0  # for any probe that starts a child, the sandbox's too
_CGROUP_PREFIX = "decompute-"


def _cgroup2_mount() -> str | None:
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, fs = line.partition(" - ")
            if fs.split()[:1] == ["cgroup2"]:
                return fields.split()[4]
    return None


def _own_cgroup(pid: int | str = "self") -> str | None:
    """This process's (or `pid`'s) cgroup v2 path, relative to the hierarchy's root."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


_cgroup_lock = threading.Lock()
_cgroup_ids = itertools.count()
_cgroups_dying: set[str] = set()  # killed, but the kernel had not emptied them yet


@cache
def _cgroup_base() -> str | None:
    """Where this provider may create a cgroup per worker (root, cgroup v2), else None.

    A cgroup lets the pool see every process a task started (`cgroup.procs`), kill them all at
    once (`cgroup.kill`) and meter their CPU, the dead ones' included (`cpu.stat`).
    """
    mount, own = _cgroup2_mount(), _own_cgroup()
    if os.geteuid() != 0 or mount is None or own is None:
        return None
    base = os.path.normpath(mount + "/" + own)
    _sweep_stale_cgroups(base)
    probe = os.path.join(base, f"{_CGROUP_PREFIX}probe-{os.getpid()}")
    try:
        os.mkdir(probe, 0o755)
    except OSError as exc:
        log.debug("no cgroup for workers: %s", exc)
        return None
    try:
        if not os.path.exists(os.path.join(probe, "cgroup.kill")):
            return None  # Linux < 5.14: no way to kill a whole cgroup at once
        subprocess.run(["/bin/true"], preexec_fn=_preexec([], None, probe), check=True,
                       timeout=_PROBE_TIMEOUT)
        return base
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("no cgroup for workers: %s", exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)


def _sweep_stale_cgroups(base: str) -> None:
    """Remove worker cgroups of providers that died without cleaning up (named by their pid)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            parts = entry.name.split("-")
            if (entry.name.startswith(_CGROUP_PREFIX) and len(parts) == 3 and parts[1].isdigit()
                    and not os.path.exists(f"/proc/{parts[1]}")):
                _kill_cgroup(entry.path)


def _new_cgroup() -> str:
    base = _cgroup_base()
    if base is None:
        raise RuntimeError("cgroups were usable when probed and are not now; restart the provider")
    path = os.path.join(base, f"{_CGROUP_PREFIX}{os.getpid()}-{next(_cgroup_ids)}")
    os.mkdir(path, 0o755)
    return path


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in the cgroup at once (forks racing the kill included)."""
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
        f.write("1")


def _kill_cgroup(path: str) -> None:
    """Kill every process in the cgroup and remove it (later, if the kernel is not done yet)."""
    kill_cgroup(path)
    with _cgroup_lock:
        _cgroups_dying.add(path)
        for dying in list(_cgroups_dying):
            try:
                os.rmdir(dying)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    continue
            _cgroups_dying.discard(dying)


def cgroup_of(pid: int) -> str | None:
    """The worker cgroup directory `pid` runs in, if it is one of ours (for metering)."""
    mount, own = _cgroup2_mount_cached(), _own_cgroup(pid)
    if mount is None or own is None or not own.rsplit("/", 1)[-1].startswith(_CGROUP_PREFIX):
        return None
    return os.path.normpath(mount + "/" + own)


@cache
def _cgroup2_mount_cached() -> str | None:
    return _cgroup2_mount()


def cgroup_pids(path: str) -> list[int]:
    """Live processes in a cgroup (zombies are not listed)."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []
