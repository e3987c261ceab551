"""A provider owned by a notebook kernel: ``%decompute provide`` / ``%decompute stop-providing``.

This module owns the kernel's one provider and its lifetime. The provider serves from its own
thread and event loop (:meth:`provider.provider.Provider.start`), and every task runs in one of its
sandboxed worker processes, never in the kernel process: a task cannot see the user's variables,
and a crashing task cannot take the kernel down. It is stopped by ``stop-providing``, by unloading
the extension, and at kernel shutdown (``atexit``), so a closed notebook never leaves a provider
behind.

It earns into the kernel's own account (the identity under ``$DECOMPUTE_HOME``), the same account
the notebook's ``Client`` spends from.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from typing import Any

from gateway.units import parse_size
from notebook_ext.display import format_tokens
from provider.provider import Provider

log = logging.getLogger(__name__)

_lock = threading.Lock()
_current: KernelProvider | None = None


class KernelProvider:
    """The provider this kernel runs, with the counters the panel's "providing" section shows."""

    def __init__(self, url: str, *, name: str | None = None, cpus: int = 1,
                 memory: int | str | None = None, price: float = 0.0) -> None:
        name = name or f"{socket.gethostname()}-kernel-{os.getpid()}"
        self.provider = Provider(url, name=name, cpus=cpus,
                                 memory=parse_size(memory) if memory is not None else None,
                                 price_cpu=price)
        self.started_at: float | None = None

    @property
    def cpu_seconds(self) -> float:
        return self.provider.cpu_seconds

    # ------------------------------------------------------------------ lifetime

    def start(self, timeout: float = 60.0) -> KernelProvider:
        self.provider.start(timeout)
        self.started_at = time.monotonic()
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: running tasks are killed and re-queued elsewhere by the gateway."""
        atexit.unregister(self.stop)
        if self.started_at is not None:
            self.provider.stop(timeout)
            log.info("kernel provider %s stopped after %d tasks", self.name, self.served)
        self.started_at = None

    @property
    def running(self) -> bool:
        return self.started_at is not None

    # ------------------------------------------------------------------ what it did

    @property
    def id(self) -> str | None:
        return self.provider.id

    @property
    def name(self) -> str:
        return self.provider.ad.name

    @property
    def served(self) -> int:
        return self.provider.served

    @property
    def earnings(self) -> float:
        return float(getattr(self.provider, "earnings", 0.0) or 0.0)

    def stats(self) -> dict[str, Any]:
        """A JSON-able summary for the panel and ``repr``."""
        return {
            "id": self.id, "name": self.name, "running": self.running,
            "connected": self.provider.connected.is_set(), "cpus": self.provider.cpus,
            "price_cpu": self.provider.ad.prices.get("cpu", 0.0), "served": self.served,
            "cpu_seconds": round(self.cpu_seconds, 6), "earnings": self.earnings,
            "uptime": time.monotonic() - self.started_at if self.started_at else 0.0,
        }

    def __repr__(self) -> str:
        s = self.stats()
        state = "serving" if s["running"] else "stopped"
        return (f"<decompute kernel provider {s['name']} id={s['id']} {state}: "
                f"{s['served']} tasks, {s['cpu_seconds']:.2f} CPU-s, "
                f"{format_tokens(s['earnings'])} tokens>")


def current() -> KernelProvider | None:
    """The provider this kernel runs now, if any."""
    return _current if _current is not None and _current.running else None


def start_providing(url: str, *, name: str | None = None, cpus: int = 1,
                    memory: int | str | None = None, price: float = 0.0,
                    timeout: float = 60.0) -> KernelProvider:
    """Start this kernel's provider; a second call while one runs is an error, not a second one."""
    global _current
    with _lock:
        if current() is not None:
            raise RuntimeError(f"this kernel already provides as {_current!r}; "
                               f"run %decompute stop-providing first")
        kp = KernelProvider(url, name=name, cpus=cpus, memory=memory, price=price)
        kp.start(timeout)
        _current = kp
        return kp


def stop_providing(timeout: float = 30.0) -> KernelProvider | None:
    """Stop this kernel's provider; returns it (for its final counters), or None if none ran."""
    global _current
    with _lock:
        kp, _current = _current, None
    if kp is not None:
        kp.stop(timeout)
    return kp
