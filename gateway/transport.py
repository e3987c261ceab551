"""What every side's websocket shell shares: an ordered frame writer and the auth handshake.

The hub, provider and client react synchronously to decoded messages; :class:`FrameWriter`
turns their ``send(frame)`` calls into awaited websocket writes (with TCP back-pressure) in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from websockets.exceptions import ConnectionClosed

from gateway import protocol as p
from gateway.identity import Identity, auth_message

#: Parts smaller than this are joined (copied) into shared fragments; larger ones are sent as
#: views of themselves. With the largest message (512 MiB) that bounds the fragments of any frame
#: to about 2,600, under the 4,096 websockets accepts.
JOIN_BELOW = 256 * 1024
#: Frames larger than this are written as websocket fragments of this size (memoryview slices,
#: no copy). websockets moves 1 MiB fragments about 3x faster than one 100 MiB frame.
FRAGMENT_BYTES = 1024 * 1024
#: Keepalive: a peer that answers no ping for this long is considered gone.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0


class FrameWriter:
    """Frames waiting for one websocket, written in order by :meth:`run` until it closes."""

    def __init__(self, ws, on_sent: Callable[[int], None] | None = None,
                 max_bytes: int | None = None) -> None:
        self.ws = ws
        self.on_sent = on_sent
        self.max_bytes = max_bytes
        self.queued = 0
        self.queue: deque[p.Frame] = deque()
        self.wake = asyncio.Event()
        self.overflowed = False
        self.progress = asyncio.Event()  # set whenever a frame was written (or we closed)
        self.closed = False

    def send(self, frame: p.Frame) -> None:
        """Queue a frame; past ``max_bytes`` waiting, the peer is not reading: close it."""
        self.queue.append(frame)
        self.queued += p.frame_size(frame)
        self.wake.set()
        if self.max_bytes is not None and self.queued > self.max_bytes and not self.overflowed:
            self.overflowed = True
            asyncio.get_running_loop().create_task(
                self.ws.close(1008, "limit: too much unread data; read faster or reconnect"))

    async def drained(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait here (or the connection is gone)."""
        while self.queued > limit and not self.closed:
            self.progress.clear()
            await self.progress.wait()

    async def run(self) -> None:
        try:
            await self._write_all()
        finally:
            self.closed = True
            self.progress.set()

    async def _write_all(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.queue:
                    frame = self.queue[0]
                    size = p.frame_size(frame)
                    await self.ws.send(frame if size <= FRAGMENT_BYTES and isinstance(frame, bytes)
                                       else fragments(frame))
                    self.queue.popleft()
                    self.queued -= size
                    self.progress.set()
                    if self.on_sent is not None:
                        self.on_sent(size)

    def take_unsent(self) -> list[p.Frame]:
        """Frames never written (the connection died first), for a retry elsewhere."""
        frames = list(self.queue)
        self.queue.clear()
        self.queued = 0
        return frames


def fragments(frame: p.Frame) -> list[memoryview]:
    """The frame as websocket fragments of at most FRAGMENT_BYTES: a large part as views of
    itself (no copy), runs of small parts joined into one fragment. The peer's websockets
    refuses a message of more than 4,096 fragments (1009, "too many fragments"), and a chunked
    ``map`` frame holds a part per item: tens of thousands of tiny ones."""
    out: list[memoryview] = []
    run: list[memoryview] = []
    run_bytes = 0
    for part in [frame] if isinstance(frame, bytes) else frame:
        view = memoryview(part).cast("B")
        if view.nbytes >= JOIN_BELOW:
            if run:
                out.append(memoryview(b"".join(run)))
                run, run_bytes = [], 0
            out += [view[i:i + FRAGMENT_BYTES] for i in range(0, view.nbytes, FRAGMENT_BYTES)]
            continue
        run.append(view)
        run_bytes += view.nbytes
        if run_bytes >= FRAGMENT_BYTES:
            out.append(memoryview(b"".join(run)))
            run, run_bytes = [], 0
    if run:
        out.append(memoryview(b"".join(run)))
    return [v for v in out if v.nbytes]


async def handshake(ws, identity: Identity, role: str, *, session: str = "", name: str = "",
                    ad: p.ProviderAd | None = None, timeout: float = 30.0) -> p.Welcome:
    """Answer the gateway's challenge; return its welcome. Raises ProtocolError if refused."""
    async with asyncio.timeout(timeout):
        challenge, _ = p.decode(await ws.recv(), allowed=frozenset({"challenge"}))
        assert isinstance(challenge, p.Challenge)
        hello = p.Hello(role=role, key=identity.public_bytes, session=session, name=name, ad=ad,
                        signature=identity.sign(auth_message(challenge.nonce, role)))
        await ws.send(p.encode(hello))
        welcome, _ = p.decode(await ws.recv(), allowed=frozenset({"welcome"}))
    assert isinstance(welcome, p.Welcome)
    if welcome.gateway != challenge.gateway:
        raise p.ProtocolError(p.ErrorCode.AUTH, "gateway key changed during the handshake")
    return welcome
