"""Deadlines the gateway keeps itself: a heap of due times, never a sweep over every task.

Three kinds, each for one assignment of one task (``(task id, assignment number)``):

- ``lease``: the provider must mention the task in a heartbeat (or finish it) every
  ``Limits.lease_seconds``; renewals only move ``Task.lease_until``, and an entry that comes due
  early is pushed again at the renewed time, so a heartbeat costs no heap work.
- ``timeout``: the task's ``timeout=`` plus ``TIMEOUT_GRACE``, counted from its assignment.
- ``cancel``: after a ``Cancel``, the provider has ``Limits.cancel_grace`` to report the key.

Entries are never removed: one that no longer matches its task (finished, re-assigned) is dropped
when it comes due. Popping what is due costs O(log n) each. The hub decides what expiry means.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from enum import StrEnum

#: A provider reports a timed-out task itself at ``timeout``; the gateway waits this much longer.
TIMEOUT_GRACE = 3.0


class Kind(StrEnum):
    LEASE = "lease"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


@dataclass(order=True, slots=True)
class Due:
    """One deadline: ``task_id``'s assignment number ``assignment`` is due at ``when``."""

    when: float
    seq: int
    task_id: str = field(compare=False)
    assignment: int = field(compare=False)
    kind: Kind = field(compare=False)


class Deadlines:
    """A min-heap of due times."""

    def __init__(self) -> None:
        self._heap: list[Due] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, when: float, task_id: str, assignment: int, kind: Kind) -> None:
        heapq.heappush(self._heap, Due(when, next(self._seq), task_id, assignment, kind))

    def due(self, now: float, limit: int = 100_000) -> list[Due]:
        """Pop what is due by ``now`` (at most ``limit``, so one tick's work stays bounded)."""
        out: list[Due] = []
        while self._heap and self._heap[0].when <= now and len(out) < limit:
            out.append(heapq.heappop(self._heap))
        return out
