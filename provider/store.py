"""The provider's one store: scattered data, big results waiting to be pulled, and results kept
for Dask, within a size bound.

Values are opaque buffers (the provider never unpickles them). Entries a task held here needs
are *pinned* (a count per key, which may be taken before the key arrives); only unpinned
entries are evicted, least recently used first, to make room. ``on_evict`` tells the owner
which keys went (the provider tells the gateway, which stops counting it as their holder).
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from provider.spares import Spares


class StoreFull(Exception):
    """No room: what is pinned here already fills the bound."""


class ResultStore:
    """key -> buffers within ``limit`` bytes (None: unbounded), with waiters for keys still on
    their way and pins for keys a task needs."""

    def __init__(self, limit: int | None = None,
                 on_evict: Callable[[list[str]], None] | None = None,
                 spares: Spares | None = None) -> None:
        self.limit = limit
        #: Spare memory files of let-go blobs: they count against ``limit``, given up first.
        self.spares = spares
        self.on_evict = on_evict
        self._data: OrderedDict[str, list] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._pins: Counter[str] = Counter()
        self._doomed: set[str] = set()  # released while pinned: dropped once unpinned
        self.nbytes = 0
        self.reserved = 0  # bytes promised to transfers under way

    # ------------------------------------------------------------------ room

    def make_room(self, size: int, reserve: bool = False) -> None:
        """Evict unpinned entries (LRU first) until ``size`` more bytes fit; raises StoreFull
        if they cannot. ``reserve`` holds the room for a transfer until its :meth:`put`."""
        if self.limit is not None:
            if size > self.limit:
                raise StoreFull(f"{size:,} bytes is more than this provider's store holds "
                                f"({self.limit:,} bytes, --store-memory)")
            self.shed_spares(size)
            evicted = []
            for key in list(self._data):
                if self.nbytes + self.reserved + size <= self.limit:
                    break
                if not self._pins[key]:
                    self._drop(key)
                    evicted.append(key)
            if evicted:
                self.shed_spares(size)  # the evicted blobs' files just became spares
                if self.on_evict is not None:
                    self.on_evict(evicted)
            if self.nbytes + self.reserved + size > self.limit:
                raise StoreFull(
                    f"this provider's store is full: {self.nbytes + self.reserved:,} of "
                    f"{self.limit:,} bytes are needed by tasks it holds")
        if reserve:
            self.reserved += size

    @property
    def held(self) -> int:
        """Bytes held against ``limit``: entries and spares."""
        return self.nbytes + (self.spares.nbytes if self.spares is not None else 0)

    def close(self) -> None:
        """The provider stops: spares go now, and any given back later is closed at once."""
        if self.spares is not None:
            self.spares.close()

    def shed_spares(self, size: int = 0) -> None:
        """Keep spares to the room left with ``size`` more bytes (and within their own limit)."""
        if self.spares is not None:
            room = self.spares.limit if self.limit is None else (
                self.limit - self.nbytes - self.reserved - size)
            self.spares.shed_to(room)

    def unreserve(self, size: int) -> None:
        self.reserved = max(0, self.reserved - size)

    # ------------------------------------------------------------------ entries

    def put(self, key: str, buffers: Sequence[bytes | bytearray | memoryview], *,
            copy: bool = True, reserved: int = 0) -> None:
        """Keep ``buffers`` under ``key`` (copied unless ``copy=False``: the caller hands them
        over). Raises StoreFull if there is no room (``reserved`` bytes were held for it)."""
        if key in self._data:
            self.unreserve(reserved)
            return
        size = sum(memoryview(b).nbytes for b in buffers)
        self.unreserve(reserved)
        self.make_room(size)
        self._data[key] = [bytes(b) for b in buffers] if copy else list(buffers)
        self._sizes[key] = size
        self.nbytes += size
        self._event(key).set()

    def get(self, key: str) -> list | None:
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._data

    async def wait(self, key: str) -> list:
        """The key's buffers, once they are here."""
        await self._event(key).wait()
        return self._data[key]

    def pin(self, key: str) -> None:
        self._pins[key] += 1

    def unpin(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
            if key in self._doomed:
                self.release(key)

    def release(self, key: str) -> None:
        """Nobody outside needs ``key`` any more: dropped now, or once its pins are gone."""
        if self._pins[key]:
            self._doomed.add(key)
            return
        self._doomed.discard(key)
        self._drop(key)

    def _drop(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            self.nbytes -= self._sizes.pop(key)
        event = self._arrived.get(key)
        if event is not None and event.is_set():
            del self._arrived[key]

    def _event(self, key: str) -> asyncio.Event:
        event = self._arrived.get(key)
        if event is None:
            event = self._arrived[key] = asyncio.Event()
        return event
