"""What runs in a task worker's child process between fork and exec, before any client code.

Split out of `provider.sandbox` (which builds the whole worker recipe) because both it and
`provider.cgroups` (whose probe starts a child in a cgroup) need the same hook; it owns the umask,
the join of the worker's cgroup, the parent-death signal and the rlimits and uid switch, kept to
plain syscalls since it runs in a forked child.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable
from functools import cache

_PR_SET_PDEATHSIG = 1


@cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded before any fork (a child between fork and exec must not load it)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _preexec(rlimits: list[tuple[int, int]], uid: int | None, cgroup: str | None = None,
             pdeathsig: bool = False) -> Callable[[], None]:
    prctl = _prctl() if pdeathsig else None
    procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None

    def apply() -> None:  # runs in the child between fork and exec: keep it to plain syscalls
        os.umask(0o077)
        if procs is not None:  # before anything can fork: every descendant is counted
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if prctl is not None:  # unshare(1) stays as the worker's parent: it must die with us
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for which, value in rlimits:
            resource.setrlimit(which, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply
