"""Hostile peers for attack tests: a fake provider that speaks the wire protocol and nothing more.

A :class:`FakeProvider` authenticates like a real provider (its own Ed25519 key, or one it shares
with another fake to pose as two connections of one account), then does exactly what the test
tells it: it records the assignments, cancels, fetches and data it is sent, and sends any message
the test builds (results for tasks it never ran, inflated usage, forged ``Data`` frames, ...).
It runs its own event loop in a thread so that tests stay plain synchronous code.

This is a test helper: the product has no flag that makes a provider misbehave.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle
from websockets.asyncio.client import connect

from gateway import protocol as p
from gateway.identity import Identity
from gateway.transport import FrameWriter, handshake
from provider.provider import local_runtime


def result_buffers(value: Any) -> list[bytes]:
    """A value as a real provider would return it (pickle-5, no out-of-band buffers here)."""
    return [cloudpickle.dumps(value, protocol=5)]


class FakeProvider:
    """One provider connection under the test's control.

    ``identity`` may be shared between fakes (two connections of one account); by default each
    fake has its own key kept in ``home``. Received messages land in thread-safe queues:
    ``assigned`` (``(Assignment, payload buffers)``), ``cancelled`` (keys), ``fetched`` (keys),
    ``data`` (``(Data, buffers)``), ``other`` (any other message).
    """

    def __init__(self, url: str, home: Path, *, name: str = "fake", cpus: int = 1,
                 memory: int = 2**30, slots: int | None = None,
                 prices: dict[str, float] | None = None, identity: Identity | None = None,
                 sandbox: str = "strong") -> None:
        self.url = url
        self.identity = identity or Identity.load_or_create(home)
        self.ad = p.ProviderAd(name=name, cpus=cpus, memory=memory, runtime=local_runtime(),
                               prices=dict(prices or {}), sandbox=sandbox,
                               slots=slots or cpus)
        self.id: str | None = None
        self.assigned: queue.Queue[tuple[p.Assignment, list[memoryview]]] = queue.Queue()
        self.cancelled: queue.Queue[str] = queue.Queue()
        self.fetched: queue.Queue[str] = queue.Queue()
        self.data: queue.Queue[tuple[p.Data, list[memoryview]]] = queue.Queue()
        self.chunks: queue.Queue[tuple[p.Chunk, bytes]] = queue.Queue()
        self.other: queue.Queue[p.Message] = queue.Queue()
        self.closed = threading.Event()
        self.close_reason: str = ""
        self._connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: FrameWriter | None = None
        self._ws = None
        self._thread: threading.Thread | None = None

    @property
    def account(self) -> str:
        return self.identity.account

    # ------------------------------------------------------------------ lifetime

    def start(self, timeout: float = 20.0) -> FakeProvider:
        self._thread = threading.Thread(target=self._run, name=f"fake-{self.ad.name}",
                                        daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"fake provider {self.ad.name} did not connect: "
                               f"{self.close_reason or 'no welcome'}")
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Drop the connection (as a provider that vanishes does)."""
        if self._loop is not None and self._ws is not None and not self.closed.is_set():
            asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> FakeProvider:
        return self if self._thread is not None else self.start()  # one connection, not two

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # the test reads it from close_reason
            self.close_reason = self.close_reason or repr(exc)
        finally:
            self.closed.set()
            self._connected.set()  # wake start(); it sees closed

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with connect(self.url, compression=None, max_size=2**31) as ws:
            self._ws = ws
            welcome = await self._hello(ws)
            self.id = welcome.session
            self._writer = FrameWriter(ws)
            writer = asyncio.create_task(self._writer.run())
            self._connected.set()
            try:
                async for data in ws:
                    self._receive(data)
            finally:
                writer.cancel()
                if ws.close_reason:
                    self.close_reason = ws.close_reason

    async def _hello(self, ws) -> p.Welcome:
        return await handshake(ws, self.identity, "provider", ad=self.ad, name=self.ad.name)

    def _receive(self, data: bytes) -> None:
        msg, buffers = p.decode(data)
        if isinstance(msg, p.Assign):
            payloads = p.split_buffers([t.nb for t in msg.tasks], buffers[len(msg.funcs):])
            for spec, payload in zip(msg.tasks, payloads, strict=True):
                self.assigned.put((spec, payload))
        elif isinstance(msg, p.Cancel):
            for key in msg.keys:
                self.cancelled.put(key)
        elif isinstance(msg, p.Fetch):
            for key in msg.keys:
                self.fetched.put(key)
        elif isinstance(msg, p.Data):
            self.data.put((msg, list(buffers)))
        elif isinstance(msg, p.Chunk):
            self.chunks.put((msg, bytes(buffers[0])))
        else:
            self.other.put(msg)

    # ------------------------------------------------------------------ sending

    def send(self, msg: p.Message, buffers: Sequence[bytes | memoryview] = ()) -> None:
        """Send any message, as is (the gateway decides what to make of it)."""
        frame = p.encode_parts(msg, list(buffers)) if buffers else p.encode(msg)
        assert self._loop is not None and self._writer is not None, "not connected"
        self._loop.call_soon_threadsafe(self._writer.send, frame)

    def next_assignment(self, timeout: float = 20.0) -> tuple[p.Assignment, list[memoryview]]:
        try:
            return self.assigned.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"fake provider {self.ad.name}: no assignment in {timeout} s") \
                from None

    def finish(self, key: str, value: Any = None, *, usage: dict[str, float] | None = None,
               buffers: Sequence[bytes] | None = None, **fields: Any) -> None:
        """Report ``key`` finished with ``value`` (or raw ``buffers``) and the usage given."""
        bufs = list(buffers) if buffers is not None else result_buffers(value)
        self.send(p.Results(results=[p.Result(key=key, status="finished", nb=len(bufs),
                                               usage=dict(usage or {}), **fields)]), bufs)

    def fail(self, key: str, message: str = "fake failure", *,
             usage: dict[str, float] | None = None) -> None:
        error = p.RemoteFailure(type="RuntimeError", module="builtins", message=message)
        self.send(p.Results(results=[p.Result(key=key, status="error", error=error,
                                               usage=dict(usage or {}))]))

    def heartbeat(self, usage: dict[str, dict[str, float]],
                  load: dict[str, float] | None = None) -> None:
        self.send(p.Heartbeat(load=dict(load or {}), usage=usage))


class FakeClient(FakeProvider):
    """A client connection under the test's control: a hostile client that speaks the wire
    protocol (huge batches, graphs, mass cancels) without the real client's own limits. Results it
    receives land in ``results`` (the :class:`gateway.protocol.Result` headers), anything else in
    ``other``."""

    def __init__(self, url: str, home: Path, *, session: str = "",
                 identity: Identity | None = None) -> None:
        super().__init__(url, home, name="fake-client", identity=identity)
        self.session = session or secrets.token_hex(8)
        self.results: queue.Queue[p.Result] = queue.Queue()

    async def _hello(self, ws) -> p.Welcome:
        return await handshake(ws, self.identity, "client", session=self.session)

    def _receive(self, data: bytes) -> None:
        msg, _ = p.decode(data)
        if isinstance(msg, p.Results):
            for result in msg.results:
                self.results.put(result)
        else:
            self.other.put(msg)

    def submit(self, specs: Sequence[p.TaskSpec], funcs: dict[str, bytes],
               payloads: Sequence[Sequence[bytes]]) -> None:
        """One Submit frame, as is: ``funcs`` by hash, then each task's payload buffers."""
        buffers = [*funcs.values(), *(b for bufs in payloads for b in bufs)]
        frame = p.encode(p.Submit(tasks=list(specs), funcs=list(funcs)), buffers)  # one piece
        assert self._loop is not None and self._writer is not None, "not connected"
        self._loop.call_soon_threadsafe(self._writer.send, frame)

    def wait_results(self, n: int, timeout: float) -> list[p.Result]:
        """The next ``n`` results (TimeoutError if they do not all come in time)."""
        out: list[p.Result] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.results.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(f"fake client: {len(out)} of {n} results in {timeout} s") \
                    from None
        return out
