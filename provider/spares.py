"""Memory files of blobs the provider let go, kept a little while for the next blob of the
same account and size.

Filling a fresh ``memfd`` costs more than the copy: the kernel allocates and zeroes every page
(100 MiB took 41-59 ms with ``pwrite`` here). Writing into a spare whose pages already exist,
through the mapping the provider kept for writing, takes 9-10 ms once that mapping has been
written through once (the first pass pays its page-table faults).

Why reuse is safe:

- A spare only ever serves the account whose blob it held. The only processes that were handed
  its descriptor are that account's task processes (a worker serves one account for life), and
  a worker unmaps, or makes private, what a task left mapped before it answers
  (``provider.shared_memory.let_go``): a task that defeats that sees its own account's later
  bytes, never another's.
- Every blob file is sealed against shrinking and against writes other than through the
  provider's own mapping (``F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE``, set before any task sees it):
  a task that keeps or reopens the descriptor can neither truncate it under the provider's
  mappings (which would kill the provider with SIGBUS) nor change the stored bytes.

Spares count against the store's bound (``--store-memory``) and are given up first when the store
needs room, when there are more than ``limit`` bytes of them, and after ``ttl`` seconds unused.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections import deque
from dataclasses import dataclass, field

#: Seconds a spare is kept unused before its memory goes back to the system.
TTL = 30.0


@dataclass(eq=False)
class Spare:
    """One sealed memory file of ``size`` bytes and the mapping the provider writes it through
    (made before the seal: no writable shared mapping can be made after it)."""

    owner: str
    fd: int
    size: int
    writer: mmap.mmap
    since: float = field(default_factory=time.monotonic)

    def write(self, offset: int, data: memoryview) -> None:
        self.writer[offset:offset + data.nbytes] = data

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.writer.close()
        os.close(self.fd)


class Spares:
    """Spare memory files by account and size, at most ``limit`` bytes of them.

    :meth:`give` runs from a blob mapping's finalizer: on whichever thread dropped it last, or
    inside a garbage collection that started anywhere, even in the middle of :meth:`take`. So it
    only appends to a queue (atomic, no lock to deadlock on); :meth:`take` and :meth:`shed_to`,
    called from the provider's event loop alone, move what was given into the list they own.
    """

    def __init__(self, limit: int, ttl: float = TTL) -> None:
        self.limit = limit
        self.ttl = ttl
        self._given: deque[Spare] = deque()
        self._spares: list[Spare] = []  # oldest first; the event loop's alone
        self.reused = 0  # blobs written into a spare
        self.closed = False  # after close(), what is given back is closed at once

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self._spares) + sum(s.size for s in list(self._given))

    def give(self, spare: Spare) -> None:
        """Keep ``spare`` for its account's next blob of its size."""
        if self.closed:
            spare.close()
            return
        spare.since = time.monotonic()
        self._given.append(spare)

    def take(self, owner: str, size: int) -> Spare | None:
        """A spare of ``owner`` of exactly ``size`` bytes (the oldest: spares cycle), or None."""
        self._collect()
        for spare in self._spares:
            if spare.owner == owner and spare.size == size:
                self._spares.remove(spare)
                self.reused += 1
                return spare
        return None

    def shed_to(self, most: int) -> None:
        """Close the oldest spares until at most ``most`` bytes (and ``limit``) are kept, and
        every one unused for ``ttl`` seconds."""
        self._collect()
        now = time.monotonic()
        kept = [s for s in self._spares if now - s.since <= self.ttl]
        closing = [s for s in self._spares if now - s.since > self.ttl]
        total = sum(s.size for s in kept)
        while kept and total > max(0, min(most, self.limit)):
            total -= kept[0].size
            closing.append(kept.pop(0))
        self._spares = kept
        for spare in closing:
            spare.close()

    def close(self) -> None:
        self.closed = True
        self.shed_to(0)

    def _collect(self) -> None:
        while self._given:
            self._spares.append(self._given.popleft())
