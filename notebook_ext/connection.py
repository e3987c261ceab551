"""The client's link to the gateway: one websocket, kept alive for as long as the client is open.

It runs on the client's own event-loop thread, so a ``Client`` behaves the same in a script, a
kernel, or inside someone else's ``async`` code. When the socket drops it reconnects with the
same identity and session id, with backoff (0.1 s doubling to ``MAX_BACKOFF``), and never gives
up while open; the gateway then delivers what finished meanwhile. Frames that could not be
written wait and go out after the reconnect. ``status`` says where it stands:
connecting, connected, reconnecting, lost (away for more than ``LOST_AFTER`` seconds, still
retrying) or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway import protocol as p
from gateway.identity import Identity
from gateway.transport import PING_INTERVAL, PING_TIMEOUT, FrameWriter, handshake

log = logging.getLogger(__name__)

#: Largest message accepted from the gateway (a result arrives in one message).
MAX_MESSAGE = 1024 * 1024 * 1024
ACCEPTED = frozenset({"results", "events", "reply", "error", "want", "chunk", "abort", "stored"})

OnMessage = Callable[[p.Message, list[memoryview]], None]
#: Longest wait between two reconnect attempts: a restarted gateway is found within it.
MAX_BACKOFF = 5.0
#: Seconds without a gateway after which the status says "lost" instead of "reconnecting".
LOST_AFTER = 60.0


class GatewayLink:
    """A resilient connection; ``on_message`` is called on the loop thread for each message."""

    def __init__(self, url: str, identity: Identity, session: str, on_message: OnMessage,
                 on_resumed: Callable[[], None], on_down: Callable[[BaseException | None], None],
                 name: str = "") -> None:
        self.url = url
        self.identity = identity
        self.session = session
        self.name = name
        self.on_message = on_message
        self.on_resumed = on_resumed
        self.on_down = on_down
        self.welcome: p.Welcome | None = None
        self.connected = False
        self.closed = False
        #: loop time since which the gateway is unreachable (None while connected)
        self.down_since: float | None = None
        self.last_error: BaseException | None = None
        self._writer: FrameWriter | None = None
        self._waiting: list[bytes] = []
        self._runner: asyncio.Task | None = None

    async def open(self, timeout: float) -> p.Welcome:
        """Connect for the first time (errors propagate), then keep the link in the background."""
        ws = await self._connect(timeout)
        self._runner = asyncio.get_running_loop().create_task(self._run(ws))
        assert self.welcome is not None
        return self.welcome

    def send(self, frame: bytes) -> None:
        """Queue a frame (loop thread only); held back while reconnecting."""
        if self._writer is not None:
            self._writer.send(frame)
        else:
            self._waiting.append(frame)

    def status(self, now: float) -> str:
        """connecting, connected, reconnecting, lost or closed (``now``: loop time)."""
        if self.closed:
            return "closed"
        if self.connected:
            return "connected"
        if self.down_since is None:
            return "connecting"
        return "lost" if now - self.down_since > LOST_AFTER else "reconnecting"

    async def drained(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait to be written (or the link is down)."""
        if self._writer is not None:
            await self._writer.drained(limit)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until every queued frame is written: a client that closes
        must not lose its last words (the cancel of its running tasks)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._writer is not None and self._writer.queue:
                    await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _connect(self, timeout: float) -> ClientConnection:
        async with asyncio.timeout(timeout):
            ws = await connect(self.url, compression=None, max_size=MAX_MESSAGE,
                               ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
                               open_timeout=timeout)
            try:
                self.welcome = await handshake(ws, self.identity, "client",
                                               session=self.session, name=self.name)
            except BaseException:
                await ws.close()
                raise
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        """Serve the connection; on loss, reconnect with backoff until closed."""
        loop = asyncio.get_running_loop()
        while True:
            await self._serve(ws)
            self.down_since = loop.time()
            self.on_down(None)
            ws = await self._reconnect()
            log.info("reconnected to %s after %.1f s", self.url, loop.time() - self.down_since)
            self.down_since = None
            self.last_error = None
            self.on_resumed()

    async def _reconnect(self) -> ClientConnection:
        delay = 0.1
        while True:
            await asyncio.sleep(delay)
            try:
                return await self._connect(timeout=10.0)
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed,
                    p.ProtocolError) as exc:
                self.last_error = exc
                self.on_down(exc)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _serve(self, ws: ClientConnection) -> None:
        writer = FrameWriter(ws)
        for frame in self._waiting:
            writer.send(frame)
        self._waiting = []
        self._writer = writer
        self.connected = True
        try:
            async with asyncio.TaskGroup() as tg:
                writing = tg.create_task(writer.run())
                try:
                    await self._read(ws)
                finally:
                    writing.cancel()
        finally:
            self.connected = False
            self._writer = None
            self._waiting = [f for f in writer.take_unsent()  # blob chunks end with the link
                             if not isinstance(f, p.Transient)] + self._waiting
            await ws.close()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                try:
                    msg, buffers = p.decode(data, allowed=ACCEPTED)
                except p.ProtocolError as exc:
                    log.error("bad frame from the gateway: %s", exc)
                    await ws.close(1008, exc.reason)
                    return
                self._dispatch(msg, buffers)

    def _dispatch(self, msg: Any, buffers: list[memoryview]) -> None:
        try:
            self.on_message(msg, buffers)
        except Exception:  # a bug in one handler must not take the link down
            log.exception("error handling %s from the gateway", msg.TYPE)
