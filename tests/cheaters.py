"""Providers that run tasks in the test's own process, honestly or not: for refereed delegation.

A :class:`StepRunner` is a :class:`fakes.FakeProvider` that really runs what it is assigned
(the function and arguments the gateway relays), in a thread of the test, and records which steps
of a refereed run it executed (``ran``). With ``skip=37`` it cheats as a lazy trainer does: step
37 returns the state unchanged, and it commits the hashes of what it computed; ``garbage``
answers with no commitment at all; ``forge`` claims a verification verdict of its own. Only a
test helper: the product has no flag that makes a provider misbehave.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
from fakes import FakeProvider

from gateway import protocol as p
from provider.environments import advertised_packages
from provider.worker import dumps_result


class StepRunner(FakeProvider):
    """Runs every assignment in-process; ``skip``: the step index it does not compute."""

    def __init__(self, url: str, home: Path, *, name: str, skip: int | None = None,
                 prices: dict[str, float] | None = None, garbage: bool = False,
                 forge: dict | None = None) -> None:
        super().__init__(url, home, name=name, prices=prices)
        self.garbage = garbage  # answer refereed runs with a result that commits nothing
        self.forge = forge  # a ``verification`` it claims in its results
        self.ad = replace(self.ad, packages=advertised_packages())  # it imports what we do
        self.skip = skip
        self.funcs: dict[str, bytes] = {}
        self.ran: list[int] = []
        self.runs = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name=f"runner-{name}", daemon=True)

    def start(self, timeout: float = 20.0) -> StepRunner:
        super().start(timeout)
        self._worker.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        super().close(timeout)

    def _receive(self, data: bytes) -> None:
        msg, buffers = p.decode(data)
        if isinstance(msg, p.Assign):  # keep the function blobs (sent once per provider)
            for name, blob in zip(msg.funcs, buffers[:len(msg.funcs)], strict=True):
                self.funcs[name] = bytes(blob)
        super()._receive(data)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                spec, payload = self.assigned.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._execute(spec, payload)
            except Exception as exc:  # a task that raises fails, as on a real provider
                self.fail(spec.key, f"{type(exc).__name__}: {exc}")

    def _execute(self, spec: p.Assignment, payload: list[memoryview]) -> None:
        started = time.monotonic()
        fn = cloudpickle.loads(self.funcs[spec.func])
        args, kwargs = cloudpickle.loads(payload[0], buffers=[bytes(b) for b in payload[1:]])
        if getattr(fn, "__name__", "") != "run_segment":  # any other task: run it honestly
            value = fn(*args, **kwargs)
        else:
            segment, state, step = args

            def maybe(value: Any, i: int) -> Any:
                self.ran.append(i)
                return value if i == self.skip else step(value, i)

            value = fn(segment, state, maybe, **kwargs)
        self.runs += 1
        wall = max(time.monotonic() - started, 0.05)
        if self.garbage and getattr(fn, "__name__", "") == "run_segment":
            value = ("trust me",)
        extra = {"verification": self.forge} if self.forge else {}
        self.finish(spec.key, buffers=dumps_result(value),
                    usage={"cpu_seconds": wall, "wall_seconds": wall}, **extra)
