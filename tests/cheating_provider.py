"""Providers that compute (in-process, no sandbox) and may lie: spot-check attack tests and the
render notebook's test.

A :class:`WorkingFake` is a :class:`fakes.FakeProvider` that runs every assignment it gets as a
real worker would (``fn(*args, **kwargs)`` from the function and payload the gateway sent) and
reports the result with the wall time it took as usage. With ``lie_rate`` > 0 it returns a
wrong result instead for that share of its tasks (its own seeded draw): noise of the same shape
for an array, the opposite for a bool, ``x + 1`` for a number. A test helper only: the product
has no flag that makes a provider lie.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
from fakes import FakeProvider

from gateway import protocol as p
from provider.environments import advertised_packages


def wrong(value: Any, rng: random.Random) -> Any:
    """A plausible wrong answer of the same kind."""
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            noise = np.random.default_rng(rng.randrange(2**32)).random(value.shape)
            return (noise * 255).astype(value.dtype) if value.dtype.kind in "ui" \
                else noise.astype(value.dtype)
    except ImportError:  # numpy is in the dev extra; without it, no arrays to fake
        pass
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return ("not", value)


class WorkingFake(FakeProvider):
    """A provider connection that computes its assignments, lying on ``lie_rate`` of them."""

    def __init__(self, url: str, home: Path, *, lie_rate: float = 0.0, seed: int = 0,
                 work: float = 0.0, **kw: Any) -> None:
        super().__init__(url, home, **kw)
        # it runs tasks here, in this interpreter: it has what this environment has
        self.ad = replace(self.ad, packages=advertised_packages())
        self.lie_rate = lie_rate
        self.work = work
        self.rng = random.Random(seed)
        self.funcs: dict[str, Any] = {}
        self.ran = 0
        self.lies: set[str] = set()  # task keys it lied about (gateway task ids)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"work-{self.ad.name}",
                                        daemon=True)

    def start(self, timeout: float = 20.0) -> WorkingFake:
        super().start(timeout)
        self._worker.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._worker.join(timeout)
        super().close(timeout)

    def _receive(self, data: bytes) -> None:
        msg, buffers = p.decode(data)
        if isinstance(msg, p.Assign):
            for name, blob in zip(msg.funcs, buffers[:len(msg.funcs)], strict=True):
                self.funcs[name] = cloudpickle.loads(blob)
        super()._receive(data)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                assignment, payload = self.assigned.get(timeout=0.05)
            except queue.Empty:
                continue
            start = time.monotonic()
            try:
                args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])
                value = self.funcs[assignment.func](*args, **kwargs)
            except Exception as exc:  # a task that raises: reported as an error, as a worker does
                self.fail(assignment.key, repr(exc))
                continue
            if self.work:
                time.sleep(self.work)
            self.ran += 1
            if self.lie_rate and self.rng.random() < self.lie_rate:
                value = wrong(value, self.rng)
                self.lies.add(assignment.key)
            spent = time.monotonic() - start
            self.finish(assignment.key, value, usage={"cpu_seconds": spent,
                                                      "wall_seconds": spent})
