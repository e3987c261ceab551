"""Blobs on a provider: assembling the ones the gateway sends, sending the ones it wants, and
leaving big results here for the gateway to pull.

Incoming chunks are written into one buffer per transfer, with room reserved in the store at the
first chunk (a transfer the store cannot hold is refused with ``Abort`` at once, not after
gigabytes). Outgoing blobs leave as chunks of ``CHUNK_BYTES``, views of the stored bytes (no copy),
each sent once the connection's writer has room: a slow gateway slows us, it does not fill our
memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway import protocol as p
from gateway.blob_messages import BLOB_MIN, CHUNK_BYTES, MAX_BLOB, splice, store_key
from provider.shared_memory import Builder
from provider.store import ResultStore, StoreFull

log = logging.getLogger(__name__)

#: Bytes of our chunks that may wait in the writer before we send more.
WINDOW = 16 * 1024 * 1024


@dataclass
class Assembly:
    key: str
    size: int
    data: Builder
    got: int = 0


class BlobIO:
    """The provider's side of blob transfers (one connection at a time)."""

    def __init__(self, store: ResultStore, send: Callable[[p.Frame], None],
                 drained: Callable[[int], Awaitable[None]]) -> None:
        self.store = store
        self.send = send
        self.drained = drained
        self.incoming: dict[int, Assembly] = {}
        self.refused: set[int] = set()
        self.outgoing: dict[int, asyncio.Task] = {}
        #: Result blobs kept until the gateway has pulled them (it sends ``Drop`` then).
        self.results: set[str] = set()

    def reset(self) -> None:
        """The connection closed: transfers in either direction are over."""
        for a in self.incoming.values():
            self.store.unreserve(a.size)
            a.data.discard()
        self.incoming.clear()
        self.refused.clear()
        for task in self.outgoing.values():
            task.cancel()
        self.outgoing.clear()

    # ------------------------------------------------------------------ receiving

    def chunk(self, msg: p.Chunk, data: memoryview) -> None:
        if msg.x in self.refused:
            return
        a = self.incoming.get(msg.x)
        if a is None:
            a = self._open(msg)
            if a is None:
                return
        end = msg.offset + data.nbytes
        if msg.offset != a.got or end > a.size:
            self._refuse(msg.x, "a chunk out of order or past the blob's end")
            return
        try:
            a.data.write(msg.offset, data)
            a.got = end
            buf = a.data.finish() if a.got == a.size else None
        except OSError as exc:  # out of memory, descriptors or maps: this transfer alone fails
            self._refuse(msg.x, f"this provider could not hold the blob ({exc})")
            return
        if buf is not None:
            del self.incoming[msg.x]
            try:
                self.store.put(a.key, [buf], copy=False, reserved=a.size)
            except StoreFull as exc:
                self.send(p.encode(p.Abort(x=msg.x, reason=str(exc))))

    def _open(self, msg: p.Chunk) -> Assembly | None:
        key = store_key(msg.owner, msg.blob)
        if msg.offset != 0 or msg.size > MAX_BLOB or not msg.owner:
            self._refuse(msg.x, "a transfer must start at offset 0 and name its owner")
            return None
        data = Builder(msg.size, self.store.spares, msg.owner)  # a spare taken stops counting
        try:
            self.store.make_room(msg.size, reserve=True)
        except StoreFull as exc:
            data.discard()
            self._refuse(msg.x, str(exc))
            return None
        a = self.incoming[msg.x] = Assembly(key, msg.size, data)
        return a

    def _refuse(self, x: int, why: str) -> None:
        a = self.incoming.pop(x, None)
        if a is not None:
            self.store.unreserve(a.size)
            a.data.discard()
        self.refused.add(x)
        log.warning("refusing blob transfer %d: %s", x, why)
        self.send(p.encode(p.Abort(x=x, reason=why)))

    def abort(self, msg: p.Abort) -> None:
        """The gateway ended transfer ``x``: drop what we assembled, or stop sending."""
        a = self.incoming.pop(msg.x, None)
        if a is not None:
            self.store.unreserve(a.size)
            a.data.discard()
        task = self.outgoing.pop(msg.x, None)
        if task is not None:
            task.cancel()

    # ------------------------------------------------------------------ sending

    def want(self, msg: p.Want, tg: asyncio.TaskGroup) -> None:
        key = store_key(msg.owner, msg.blob)
        buffers = self.store.get(key)
        if buffers is None:
            self.send(p.encode(p.Abort(x=msg.x, reason=f"blob {msg.blob[:12]}… is not here "
                                                      f"(evicted or never received)")))
            return
        task = tg.create_task(self._stream(msg, key, buffers))
        self.outgoing[msg.x] = task
        task.add_done_callback(lambda _t, x=msg.x: self.outgoing.pop(x, None))

    async def _stream(self, msg: p.Want, key: str, buffers: list) -> None:
        self.store.pin(key)
        try:
            size = sum(memoryview(b).nbytes for b in buffers)
            offset = 0
            for buf in buffers:
                view = memoryview(buf).cast("B")
                for start in range(0, view.nbytes, CHUNK_BYTES):
                    piece = view[start:start + CHUNK_BYTES]
                    self.send(p.transient(p.encode_parts(p.Chunk(
                        x=msg.x, blob=msg.blob, size=size, offset=offset), [piece])))
                    offset += piece.nbytes
                    await self.drained(WINDOW)
        finally:
            self.store.unpin(key)

    # ------------------------------------------------------------------ results

    def leave_results(self, account: str, buffers: list) -> tuple[list, list]:
        """Big result buffers stay here as content-named blobs: ``(inline buffers, refs)``.
        A buffer the store cannot hold travels inline."""
        inline, refs = [], []
        for pos, buf in enumerate(buffers):
            view = memoryview(buf).cast("B")
            if view.nbytes < BLOB_MIN:
                inline.append(buf)
                continue
            bid = "s" + hashlib.sha256(view).hexdigest()
            key = store_key(account, bid)
            try:
                self.store.put(key, [buf], copy=False)
            except StoreFull:
                inline.append(buf)
                continue
            self.store.pin(key)
            self.results.add(key)
            refs.append([pos, bid, view.nbytes])
        return inline, refs

    def drop(self, keys: list[str]) -> None:
        """The gateway no longer needs these keys here."""
        for key in keys:
            if key in self.results:
                self.results.discard(key)
                self.store.unpin(key)
            self.store.release(key)

    # ------------------------------------------------------------------ dispatch and inputs

    def handle(self, msg: p.Message, buffers: list[memoryview], tg: asyncio.TaskGroup) -> bool:
        """Handle a blob message from the gateway; False if ``msg`` is not one."""
        if isinstance(msg, p.Chunk):
            self.chunk(msg, buffers[0])
        elif isinstance(msg, p.Want):
            self.want(msg, tg)
        elif isinstance(msg, p.Abort):
            self.abort(msg)
        elif isinstance(msg, p.Drop):
            self.drop(msg.blobs)
        else:
            return False
        return True

    def pin_refs(self, a: p.Assignment) -> list[str]:
        """Pin an assignment's blobs (before they arrive, too): nothing it needs is evicted."""
        keys = [store_key(a.account, bid) for _, bid, _ in a.refs]
        for key in keys:
            self.store.pin(key)
        return keys

    async def inputs(self, a: p.Assignment, inline: list
                     ) -> tuple[list, list[tuple[str, list]]]:
        """Wait for the assignment's blobs: its full payload, and its scattered values as
        ``(id, buffers)``."""
        blobs = {bid: (await self.store.wait(store_key(a.account, bid)))[0]
                 for _, bid, _ in a.refs}
        payload = splice(inline, a.refs, blobs)
        scattered = [(bid, [blobs[bid]]) for pos, bid, _ in a.refs if pos < 0]
        return payload, scattered
