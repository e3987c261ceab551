"""Drive the gateway core without sockets, as the websocket shell does.

The core (:class:`gateway.hub.Hub`) decides money in memory and leaves ledger work in its journal;
the shell hands that journal to the real accounting worker after each call and feeds the worker's
answer back. :class:`Books` does the same for tests, synchronously: ``books.commit()`` after a
call means "the shell's turn ended and the group commit came back".
"""

from __future__ import annotations

import queue

from gateway import protocol as p
from gateway.accounting_worker import AccountingWorker
from gateway.hub import Hub
from gateway.identity import Identity
from gateway.journal import Committed
from gateway.receipt_log import ReceiptLog

WAIT = 30.0


class Peer:
    """Collects the frames the core sends one peer, decoded (a client's or a provider's
    writer queue, as the shell would drain it)."""

    def __init__(self) -> None:
        self.frames: list[tuple[p.Message, list[memoryview]]] = []

    def send(self, frame: p.Frame) -> None:
        data = frame if isinstance(frame, bytes) else b"".join(bytes(b) for b in frame)
        self.frames.append(p.decode(data))

    def results(self) -> list[p.Result]:
        return [r for m, _ in self.frames if isinstance(m, p.Results) for r in m.results]

    def assigned(self) -> list[p.Assignment]:
        return [a for m, _ in self.frames if isinstance(m, p.Assign) for a in m.tasks]


class Books:
    """The real accounting worker for one hub driven by a test."""

    def __init__(self, hub: Hub, identity: Identity | None = None) -> None:
        self.hub = hub
        billing = hub.billing
        self._done: queue.Queue[Committed] = queue.Queue()
        self.log = ReceiptLog(billing.ledger.path)
        self.worker = AccountingWorker(billing.ledger, self.log, identity or billing.identity,
                                       self._done.put)
        self.worker.start()

    def load(self, account: str) -> None:
        """What the shell does before attaching a peer of ``account``."""
        accounts = self.hub.billing.accounts
        if not accounts.loaded(account):
            accounts.load(account, *self.worker.load(account).result(WAIT))

    def commit(self) -> None:
        """Commit what the core decided and feed back the answers, until nothing is left (an
        answer may decide more: a failed escrow's recovery)."""
        accounts = self.hub.billing.accounts
        while accounts.journal:
            seq, ops = accounts.take_journal()
            self.worker.submit(seq, ops)
            while True:
                done = self._done.get(timeout=WAIT)
                self.hub.committed(done)
                if done.seq >= seq:
                    break

    def close(self) -> None:
        self.commit()
        self.worker.stop()
        self.log.close()
