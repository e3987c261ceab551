"""Provider accounts' standing: how much of what they advertise the gateway believes.

Kept per *account*, never per connection, so reconnecting under a fresh connection resets
nothing. Two rules:

- **Slow start.** An account may hold at most ``allowance`` tasks at once, across all its
  connections. It starts at ``INITIAL_ALLOWANCE`` and grows by one for each task the account
  delivers (doubling per round trip, as TCP's slow start does), up to what it advertises. A loss
  halves it.
- **Benching.** A *loss* is a provider leaving while holding tasks, a lease that expires, a task
  held past its timeout or a cancel never acknowledged. ``BENCH_AFTER`` losses in a row (without a
  delivery between them) bench the account: it gets no new tasks for ``BENCH_SECONDS``, doubling
  with each bench up to ``MAX_BENCH_SECONDS``.

In memory only: a gateway restart forgives everyone (and starts them small again).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

INITIAL_ALLOWANCE = 8
BENCH_AFTER = 3
BENCH_SECONDS = 30.0
MAX_BENCH_SECONDS = 3600.0


@dataclass(slots=True)
class Record:
    """One provider account's history on this gateway."""

    allowance: int = INITIAL_ALLOWANCE
    delivered: int = 0
    losses: int = 0
    losses_in_a_row: int = 0
    benches: int = 0
    benched_until: float = 0.0


class Standing:
    """Every provider account's record, created on first sight."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}

    def of(self, account: str) -> Record:
        record = self._records.get(account)
        if record is None:
            record = self._records[account] = Record()
        return record

    def benched(self, account: str, now: float | None = None) -> bool:
        record = self._records.get(account)
        if record is None:
            return False
        return record.benched_until > (time.monotonic() if now is None else now)

    def allowance(self, account: str) -> int:
        record = self._records.get(account)
        return INITIAL_ALLOWANCE if record is None else record.allowance

    def delivered(self, account: str, n: int = 1) -> None:
        """``n`` tasks came back with an outcome: trust grows."""
        if n <= 0:
            return
        record = self.of(account)
        record.delivered += n
        record.losses_in_a_row = 0
        record.allowance += n

    def lost(self, account: str, why: str, now: float | None = None) -> None:
        """The account lost tasks it held (one event, however many tasks)."""
        record = self.of(account)
        record.losses += 1
        record.losses_in_a_row += 1
        record.allowance = max(1, record.allowance // 2)
        if record.losses_in_a_row >= BENCH_AFTER:
            seconds = min(MAX_BENCH_SECONDS, BENCH_SECONDS * 2 ** record.benches)
            record.benches += 1
            record.losses_in_a_row = 0
            record.benched_until = (time.monotonic() if now is None else now) + seconds
            log.warning("provider account %s benched for %.0f s after %d losses in a row (%s)",
                        account[:16], seconds, BENCH_AFTER, why)

    def info(self, account: str) -> dict:
        """What ``client.providers()`` shows of an account's standing."""
        record = self.of(account)
        return {"delivered": record.delivered, "losses": record.losses,
                "allowance": record.allowance, "benched": self.benched(account)}
