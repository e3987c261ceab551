"""A hostile gateway for provider tests: it speaks just enough of the protocol to welcome a real
provider process, then sends whatever frames the test builds (assignments a real gateway would
never send: unknown functions, over-long keys, junk) and records everything the provider says.

It verifies nothing about the provider (that is the real gateway's job); it exists to attack the
provider's side. It runs its own event loop in a thread, so tests stay synchronous.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
from websockets.asyncio.server import serve

from gateway import protocol as p

GATEWAY_KEY = b"\x07" * 32


def task_frame(specs: Sequence[p.Assignment], funcs: dict[str, bytes],
               payloads: Sequence[Sequence[bytes]]) -> p.Frame:
    """An ``assign`` frame as the gateway builds it, unchecked (specs may break the schema)."""
    return p.encode_parts(p.Assign(tasks=list(specs), funcs=list(funcs)),
                          [*funcs.values(), *(b for bufs in payloads for b in bufs)])


def payload(*args: Any, **kwargs: Any) -> list[bytes]:
    return [cloudpickle.dumps((args, kwargs), protocol=5)]


class FakeGateway:
    """One listening socket; the latest provider connection is the one :meth:`send` talks to."""

    def __init__(self, max_message: int = 512 * 1024 * 1024) -> None:
        self.max_message = max_message
        self.port = 0
        self.connections = 0
        self.messages: list[p.Message] = []
        self.lock = threading.Lock()
        self._ws = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> FakeGateway:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True,
                                        name="fake-gateway")
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("fake gateway did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0, compression=None,
                         max_size=self.max_message) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._done.wait()

    async def _handle(self, ws) -> None:
        await ws.send(p.encode(p.Challenge(nonce=os.urandom(32), gateway=GATEWAY_KEY)))
        hello, _ = p.decode(await ws.recv(), allowed=frozenset({"hello"}))
        assert isinstance(hello, p.Hello) and hello.ad is not None
        await ws.send(p.encode(p.Welcome(account=hello.key.hex(), session=f"{hello.ad.name}-fake",
                                         gateway=GATEWAY_KEY, max_message=self.max_message)))
        self._ws = ws
        with self.lock:
            self.connections += 1
        async for data in ws:
            msg, buffers = p.decode(data)  # a provider frame we cannot read fails the test
            with self.lock:
                self.messages.append(msg)

    def send(self, frame: p.Frame) -> None:
        assert self._loop is not None and self._ws is not None, "no provider connected"
        asyncio.run_coroutine_threadsafe(self._ws.send(frame), self._loop).result(10)

    # ------------------------------------------------------------------ what the provider said

    def of_type(self, cls: type[p.Message]) -> list[Any]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, cls)]

    def results(self) -> dict[str, p.Result]:
        return {r.key: r for msg in self.of_type(p.Results) for r in msg.results}

    def heartbeat_where(self, predicate: Callable[[p.Heartbeat], bool]) -> p.Heartbeat | None:
        return next((h for h in reversed(self.of_type(p.Heartbeat)) if predicate(h)), None)
