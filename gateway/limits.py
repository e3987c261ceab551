"""Limits that protect the gateway from any one peer; past a limit that peer alone is refused.

Each bound says what it protects:

- ``open_tasks``: tasks one account may have pending or running. Bounds the task table and the
  scheduler queue (each task holds its payload in memory until it runs).
- ``queued_bytes``: payload bytes one account may have waiting on the gateway. Bounds memory.
- ``graph_tasks``: graph task records one account may have on the gateway (waiting, running, or
  finished and kept). Bounds the graph's memory and the work one failure can fan out to.
- ``lease_seconds``: a provider must mention each task it holds in a heartbeat (or finish it)
  this often, else the task is taken back and runs elsewhere. Bounds how long a provider that
  went silent can hold work.
- ``cancel_grace``: seconds a provider has to report a cancelled task before the gateway frees
  its slot anyway. Bounds how long a cancel can keep capacity counted as busy.
- ``rejoin_grace``: seconds a task that no online provider can take (after one left) waits for
  one to come back before it fails; ``no_provider_wait`` the same while no provider at all is
  online. Bounds how long such tasks hold memory and escrow; long enough for a reconnect.
- ``bad_frames`` in ``bad_frame_window`` seconds: frames from one authenticated peer that fail to
  decode or validate. Each is answered with an ``Error`` and dropped; past this many in the window
  the peer is taken to be sending garbage and its connection is closed.
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
    graph_tasks: int = 500_000
    lease_seconds: float = 30.0
    cancel_grace: float = 10.0
    rejoin_grace: float = 30.0
    no_provider_wait: float = 60.0
    bad_frames: int = 50
    bad_frame_window: float = 10.0
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
