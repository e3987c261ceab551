"""Limits that protect the gateway from any one peer; past a limit that peer alone is refused.

Each bound says what it protects:

- ``open_tasks``: tasks one account may have pending or running. Bounds the task table and the
  scheduler queue (each task holds its payload in memory until it runs).
- ``queued_bytes``: payload bytes one account may have waiting on the gateway. Bounds memory.
- ``messages_per_second`` / ``burst``: a token bucket per connection. Past it the gateway reads
  that connection more slowly (TCP back-pressure) and tells it once; no message is dropped.
- ``writer_bytes``: frames waiting to be written to one slow reader. Past it the connection is
  closed; a client session keeps its results in its (bounded) outbox for the reconnect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    open_tasks: int = 200_000
    queued_bytes: int = 8 * 1024**3
    messages_per_second: float = 5_000.0
    burst: float = 10_000.0
    writer_bytes: int = 2 * 1024**3


class TokenBucket:
    """``rate`` messages a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Spend one token; return how long to wait first (0.0 when within the limit)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate
