"""Memory files of blobs the provider let go, kept a little while for the next blob of the
same account.

Filling a fresh ``memfd`` costs more than the copy: the kernel allocates and zeroes every page
(100 MiB took 41-59 ms with ``pwrite`` here). Writing into a spare whose pages already exist,
through a mapping kept for writing, takes 9-10 ms once that mapping has been written through
once (the first pass pays its page-table faults). A spare is only ever reused for the account
whose blob it held: the only processes that can still map it are that account's own task
processes (a worker serves one account for life, and unmaps or privatizes what a task left
mapped before it answers, see ``provider.shared_memory.let_go``), so reuse can never show one
account's bytes to another.

Spares count against the store's bound (``--store-memory``) and are given up first when the store
needs room, when there are more than ``limit`` bytes of them, and after ``ttl`` seconds unused.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

#: Seconds a spare is kept unused before its memory goes back to the system.
TTL = 30.0


@dataclass(eq=False)
class Spare:
    """One memory file: its descriptor, its size now, and the mapping we write it through."""

    owner: str
    fd: int
    size: int
    writer: mmap.mmap | None = None  # made on first reuse, at ``capacity`` bytes
    capacity: int = 0
    since: float = field(default_factory=time.monotonic)

    def fit(self, size: int) -> None:
        """Make the file ``size`` bytes long (shrinking frees the pages past it)."""
        if size != self.size:
            os.ftruncate(self.fd, size)
            self.size = size
        if self.writer is None or size > self.capacity:
            if self.writer is not None:
                self.writer.close()
            self.writer, self.capacity = mmap.mmap(self.fd, size), size

    def write(self, offset: int, data: memoryview) -> None:
        assert self.writer is not None and offset + data.nbytes <= self.size
        self.writer[offset:offset + data.nbytes] = data

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(BufferError):
                self.writer.close()
        os.close(self.fd)


class Spares:
    """Spare memory files by account, at most ``limit`` bytes of them (thread-safe: a blob's
    mapping may be freed, and its file given back, on whichever thread dropped it last)."""

    def __init__(self, limit: int, ttl: float = TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._spares: list[Spare] = []  # oldest first
        self._lock = threading.Lock()
        self.reused = 0  # blobs written into a spare (reported in the provider's stats)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self._spares)

    def take(self, owner: str, size: int) -> Spare | None:
        """The smallest spare of ``owner`` that holds ``size`` bytes (at most twice that, so
        little is kept for nothing), fitted to ``size``; None if there is none."""
        with self._lock:
            fits = [s for s in self._spares
                    if s.owner == owner and size <= max(s.size, s.capacity) <= 2 * size]
            if not fits:
                return None
            spare = min(fits, key=lambda s: max(s.size, s.capacity))
            self._spares.remove(spare)
        try:
            spare.fit(size)
        except OSError:
            spare.close()
            return None
        self.reused += 1
        return spare

    def give(self, spare: Spare) -> None:
        """Keep ``spare`` for its account's next blob (or close it if it does not fit)."""
        if spare.size > self.limit:
            spare.close()
            return
        spare.since = time.monotonic()
        with self._lock:
            self._spares.append(spare)
        self.shed_to(self.limit)

    def shed_to(self, most: int) -> None:
        """Close the oldest spares until at most ``most`` bytes (and ``limit``) are kept, and
        every one unused for ``ttl`` seconds."""
        now = time.monotonic()
        with self._lock:
            closing = [s for s in self._spares if now - s.since > self.ttl]
            kept = [s for s in self._spares if now - s.since <= self.ttl]
            total = sum(s.size for s in kept)
            while kept and total > max(0, min(most, self.limit)):
                total -= kept[0].size
                closing.append(kept.pop(0))
            self._spares = kept
        for spare in closing:
            spare.close()

    def close(self) -> None:
        self.shed_to(0)
