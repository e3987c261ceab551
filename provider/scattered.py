"""Scattered values inside a task process: what a client's ``Scattered`` reference unpickles to.

The client pickles a scattered future as ``resolve(id)``; before a task's arguments are loaded,
its worker fills :data:`TABLE` with the values the task names (kept in a small per-process cache,
so a second task on the same 100 MiB array does not receive or unpickle it again).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

#: Values a worker keeps between tasks. The provider mirrors this cache (same size, same order
#: of use) to know which values it need not send again.
CACHE_SIZE = 4

#: id -> value of the scattered data the current task reads.
TABLE: dict[str, Any] = {}


def resolve(blob_id: str) -> Any:
    """The scattered value named ``blob_id`` (called while a task's arguments are unpickled)."""
    try:
        return TABLE[blob_id]
    except KeyError:
        raise LookupError(f"scattered data {blob_id[:12]}… did not reach this task; scatter it "
                          f"again") from None


def note_use(cache: OrderedDict, blob_id: str) -> bool:
    """Record a use of ``blob_id`` in an LRU of ``CACHE_SIZE``; True if it was not cached
    (the worker and the provider run this same rule, so they agree on what is cached)."""
    if blob_id in cache:
        cache.move_to_end(blob_id)
        return False
    cache[blob_id] = None
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return True
