"""Plain helpers shared by the test fixtures (``conftest.py``, ``kernel_fixtures.py``) and tests.

Waiting on a condition with a deadline, a free loopback port, a plain HTTP GET, whether a process
has exited, and starting one of our processes with its own ``DECOMPUTE_HOME``. No fixtures here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not hold in time: a test failure, and a timeout to whoever catches one."""


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, message: str = "the condition",
             *, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """``(status, body)`` of a plain GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def gone(proc: psutil.Process | int) -> bool:
    """True once ``proc`` (a process or a pid) has exited (a zombie waiting for its parent counts
    as exited)."""
    try:
        if isinstance(proc, int):
            proc = psutil.Process(proc)
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a process with its own ``DECOMPUTE_HOME``, unbuffered."""
    return dict(os.environ, DECOMPUTE_HOME=str(home), PYTHONUNBUFFERED="1", **extra)


def spawn(cmd: list[str], home: Path, log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in ``cwd`` with its own ``DECOMPUTE_HOME``; stdout and stderr go to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=home_env(home), stdout=out,
                                stderr=subprocess.STDOUT)
