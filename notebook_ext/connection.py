"""The client's link to the gateway: one websocket, kept alive across short outages.

It runs on the client's own event-loop thread, so a ``Client`` behaves the same in a script, a
kernel, or inside someone else's ``async`` code. When the socket drops it reconnects with the
same identity and session id (the gateway then delivers what finished meanwhile); frames that
could not be written wait and go out after the reconnect. Only after ``reconnect_for`` seconds
without a gateway does it give up and report the loss.
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
ACCEPTED = frozenset({"results", "events", "reply", "error"})

OnMessage = Callable[[p.Message, list[memoryview]], None]


class GatewayLink:
    """A resilient connection; ``on_message`` is called on the loop thread for each message."""

    def __init__(self, url: str, identity: Identity, session: str, on_message: OnMessage,
                 on_resumed: Callable[[], None], on_lost: Callable[[BaseException], None],
                 name: str = "", reconnect_for: float = 60.0) -> None:
        self.url = url
        self.identity = identity
        self.session = session
        self.name = name
        self.on_message = on_message
        self.on_resumed = on_resumed
        self.on_lost = on_lost
        self.reconnect_for = reconnect_for
        self.welcome: p.Welcome | None = None
        self.connected = False
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

    async def close(self) -> None:
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
        """Serve the connection; on loss, reconnect until ``reconnect_for`` runs out."""
        while True:
            await self._serve(ws)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.reconnect_for
            delay, error = 0.1, None
            while loop.time() < deadline:
                await asyncio.sleep(delay)
                try:
                    ws = await self._connect(timeout=10.0)
                    break
                except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed,
                        p.ProtocolError) as exc:
                    error = exc
                    delay = min(delay * 2, 2.0)
            else:
                self.on_lost(error or ConnectionError("gateway unreachable"))
                return
            log.info("reconnected to %s", self.url)
            self.on_resumed()

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
            self._waiting = writer.take_unsent() + self._waiting
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
