"""Delivery: what the gateway tells its clients, and the sessions it tells it to.

One owner for client sessions, for cutting results into frames, and for results that wait for
their receipt (a paid result goes out only once its settlement is committed as a receipt-log
leaf; the accounting worker's answer releases it, or fails it if the ledger failed that escrow).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from gateway import protocol as p
from gateway.sessions import ClientSession

log = logging.getLogger(__name__)

#: Results per frame the gateway makes itself (failures of a whole chain, cancels).
RESULTS_PER_FRAME = 1_000
#: Bytes of error text per such frame: keeps its header far under the decoder's limit.
RESULT_TEXT_PER_FRAME = 1024 * 1024

Item = tuple[p.Result, list[memoryview]]


class Delivery:
    """Client sessions and the frames sent to them. ``overflow(session)`` is called when a
    disconnected session's outbox passes its bound (the core then cancels its tasks)."""

    def __init__(self, overflow: Callable[[ClientSession], None]) -> None:
        self.sessions: dict[str, ClientSession] = {}
        self._overflow = overflow
        #: Results waiting for their leaf (by leaf token): session, result, buffers, escrows.
        self._waiting: dict[int, tuple[str, p.Result, list[memoryview], tuple[str, ...]]] = {}

    def send(self, session: ClientSession, items: list[Item]) -> None:
        for chunk in frames_of(items):
            frame = p.encode_parts(p.Results(results=[r for r, _ in chunk]),
                                   [b for _, bufs in chunk for b in bufs])
            if not session.send(frame):
                log.error("session %s: outbox over its bound; giving the session up", session.id)
                self._overflow(session)
                return

    def send_to(self, session_id: str, items: list[Item]) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self.send(session, items)

    def event(self, session_id: str, event: p.Event) -> None:
        """Progress for a connected client (a disconnected one gets the result, not the past)."""
        session = self.sessions.get(session_id)
        if session is not None and session.connected:
            session.send(p.encode(p.Events(events=[event])))

    def wait_for_receipt(self, token: int, session_id: str, result: p.Result,
                         bufs: list[memoryview], escrows: Sequence[str]) -> None:
        self._waiting[token] = (session_id, result, bufs, tuple(escrows))

    def committed(self, receipts: Mapping[int, dict | None], failed: Mapping[str, str],
                  failure: Callable[[str, str], p.Result]) -> None:
        """A group commit came back: waiting results go out with their receipts; one whose
        escrow the ledger failed goes out as ``failure(key, why)`` instead."""
        out: dict[str, list[Item]] = defaultdict(list)
        for token in [t for t, w in self._waiting.items() if set(w[3]) & failed.keys()]:
            session_id, result, _, escrows = self._waiting.pop(token)
            why = next(failed[e] for e in escrows if e in failed)
            out[session_id].append((failure(result.key, why), []))
        for token, receipt in receipts.items():
            waiting = self._waiting.pop(token, None)
            if waiting is not None:
                session_id, result, bufs, _ = waiting
                out[session_id].append((replace(result, receipt=receipt), bufs))
        for session_id, items in out.items():
            self.send_to(session_id, items)


def frames_of(items: list[Item]) -> list[list[Item]]:
    """Results cut into frames of at most ``RESULTS_PER_FRAME`` results and about
    ``RESULT_TEXT_PER_FRAME`` bytes of error text (a chain's failures share one long message)."""
    if len(items) <= 1:
        return [items]
    out: list[list[Item]] = [[]]
    text = 0
    for item in items:
        size = item[0].text_size
        if out[-1] and (len(out[-1]) >= RESULTS_PER_FRAME or text + size > RESULT_TEXT_PER_FRAME):
            out.append([])
            text = 0
        out[-1].append(item)
        text += size
    return out
