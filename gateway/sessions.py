"""Client sessions: a session outlives its websocket so a client that reconnects gets its results.

A ``Client`` picks a random session id and keeps it across reconnects. While it is away, frames
meant for it wait in an outbox (bounded: past ``MAX_OUTBOX_BYTES`` the session is given up and its
tasks are cancelled, so one absent client cannot exhaust the gateway's memory). A session away
longer than ``LINGER_SECONDS`` is given up the same way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.protocol import Frame, Send, frame_size

#: Bytes of undelivered result frames kept for one disconnected session.
MAX_OUTBOX_BYTES = 2 * 1024**3
#: How long a disconnected session's tasks keep running and its results keep waiting.
LINGER_SECONDS = 300.0


@dataclass(slots=True, eq=False)
class ClientSession:
    """One client's session: its account, its live connection (if any) and its tasks."""

    id: str
    account: str
    send_fn: Send | None = None
    outbox: deque[Frame] = field(default_factory=deque)
    outbox_bytes: int = 0
    away_since: float | None = None

    @property
    def connected(self) -> bool:
        return self.send_fn is not None

    def send(self, frame: Frame) -> bool:
        """Deliver now, or keep for the reconnect; False once the outbox is over its bound."""
        if self.send_fn is not None:
            self.send_fn(frame)
            return True
        self.outbox.append(frame)
        self.outbox_bytes += frame_size(frame)
        return self.outbox_bytes <= MAX_OUTBOX_BYTES

    def attach(self, send_fn: Send) -> int:
        """A (re)connection: flush what waited, in order. Returns how many frames were sent."""
        self.send_fn = send_fn
        self.away_since = None
        flushed = len(self.outbox)
        while self.outbox:
            send_fn(self.outbox.popleft())
        self.outbox_bytes = 0
        return flushed

    def detach(self, unsent: Sequence[Frame] = ()) -> None:
        """The connection is gone; ``unsent`` frames (its writer's queue) wait, first in line."""
        self.send_fn = None
        self.away_since = time.monotonic()
        self.outbox.extendleft(reversed(unsent))
        self.outbox_bytes += sum(frame_size(f) for f in unsent)

    def expired(self, now: float) -> bool:
        return self.away_since is not None and now - self.away_since > LINGER_SECONDS
