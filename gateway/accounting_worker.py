"""The accounting worker: the one thread that writes the ledger and the receipt log.

The gateway core decides money in memory (:mod:`gateway.accounts`) and hands its journal over
after each turn; this thread takes every journal waiting and applies them in ONE SQLite
transaction (a group commit: while one commits, the next group gathers, so a lone task waits one
commit and a busy gateway commits thousands of ops at once), appends the receipt-log leaves in that
same transaction, then signs ONE tree head over them and makes each leaf's receipt. The answer
(:class:`gateway.journal.Committed`) goes back to the event loop through ``deliver``.

Failures are contained: an op the ledger refuses fails its escrow alone (and every later op of it,
until the core acknowledges with a recovery refund); a transaction that fails as a whole fails the
escrows of every op in it. The event loop never waits on SQLite or on a signature.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from gateway.identity import Identity
from gateway.journal import Committed, Leaf, LedgerOp, Op, Refund
from gateway.ledger import Ledger
from gateway.receipt_log import ReceiptLog, ReceiptLogError, append_leaves

log = logging.getLogger(__name__)

#: Ops applied in one transaction at most: bounds one commit's latency under a flood.
MAX_OPS_PER_COMMIT = 50_000


@dataclass(slots=True)
class _Work:
    journals: list[tuple[int, list[Op]]] = field(default_factory=list)
    loads: list[tuple[str, Future]] = field(default_factory=list)


class AccountingWorker:
    """Applies journals in group commits on its own thread; see the module docstring."""

    def __init__(self, ledger: Ledger, receipt_log: ReceiptLog, identity: Identity,
                 deliver: Callable[[Committed], None]) -> None:
        self.ledger = ledger
        self.log = receipt_log
        self.identity = identity
        self.deliver = deliver
        self._cv = threading.Condition()
        self._work = _Work()
        self._stopping = False
        self._seen = ledger.last_transfer()
        self._refused: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="accounting", daemon=True)
        self.commits = 0  # group commits made (for /metrics)
        self.ops = 0  # ops applied

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: int, ops: list[Op]) -> None:
        """A journal of the core's (numbered by :meth:`Accounts.take_journal`)."""
        with self._cv:
            self._work.journals.append((seq, ops))
            self._cv.notify()

    def load(self, account: str) -> Future:
        """The account's (balance, earnings) in micro-tokens, created with its faucet if new."""
        fut: Future = Future()
        with self._cv:
            self._work.loads.append((account, fut))
            self._cv.notify()
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        """Apply what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._work.journals or self._work.loads or self._stopping):
                    self._cv.wait()
                work, self._work = self._take()
                if not (work.journals or work.loads) and self._stopping:
                    return
            try:
                self._commit(work)
            except Exception:  # never let the thread die: the core would wait forever
                log.exception("accounting worker: a group commit failed unexpectedly")

    def _take(self) -> tuple[_Work, _Work]:
        """Up to :data:`MAX_OPS_PER_COMMIT` ops' worth of journals (whole journals), every
        load; the rest stays queued."""
        now, rest, n = _Work(loads=self._work.loads), _Work(), 0
        for i, (seq, ops) in enumerate(self._work.journals):
            if now.journals and n + len(ops) > MAX_OPS_PER_COMMIT:
                rest.journals = self._work.journals[i:]
                break
            now.journals.append((seq, ops))
            n += len(ops)
        return now, rest

    def _commit(self, work: _Work) -> None:
        ops = [op for _, journal in work.journals for op in journal]
        seq = max((s for s, _ in work.journals), default=0)
        ledger_ops: list[LedgerOp] = [op for op in ops if not isinstance(op, Leaf)]
        leaves = [op for op in ops if isinstance(op, Leaf)]
        refused = set(self._refused)

        def append(db: sqlite3.Connection, failed: set[str]) -> tuple[list[Leaf], int]:
            good = [lf for lf in leaves if not (set(lf.escrows) & (failed | refused))]
            first = append_leaves(db, [lf.entry for lf in good]) if good else 0
            return good, first

        loads = [account for account, _ in work.loads]
        try:
            applied = self.ledger.apply(ledger_ops, seen=self._seen, refused=refused, loads=loads,
                                        then=append)
        except Exception as exc:  # the transaction as a whole: every escrow in it fails
            log.error("accounting: a group commit of %d ops failed: %s", len(ops), exc)
            failed = {op.task_id: f"the ledger's transaction failed: {exc}"
                      for op in ledger_ops}
            for leaf in leaves:
                failed.update((e, f"the ledger's transaction failed: {exc}")
                              for e in leaf.escrows)
            self._refused |= failed.keys()
            for _, fut in work.loads:
                fut.set_exception(exc)
            if work.journals:
                self.deliver(Committed(seq, failed, {}, {}))
            return
        self._seen = applied.last
        self.commits += 1
        self.ops += len(ops)
        recovered = {op.task_id for op in ledger_ops
                     if isinstance(op, Refund) and op.recovery} - applied.failed.keys()
        self._refused = (self._refused | applied.failed.keys()) - recovered
        for account, fut in work.loads:
            fut.set_result(applied.loaded[account])
        if applied.failed:
            log.error("accounting: %d escrows failed in the ledger: %s", len(applied.failed),
                      "; ".join(f"{k}: {v}" for k, v in list(applied.failed.items())[:3]))
        good, first = applied.extra or ([], 0)
        receipts = self._receipts(good, first)
        if work.journals or applied.external:
            self.deliver(Committed(seq, applied.failed, receipts, applied.external))

    def _receipts(self, good: list[Leaf], first: int) -> dict[int, dict | None]:
        """Sign one head over the new leaves and make their receipts; a leaf that is logged
        but gets no receipt (the signing failed) maps to None: its proof is in the log."""
        if not good:
            return {}
        try:
            head = self.log.sign_head(self.identity)
            made = self.log.receipts(first, first + len(good), head)
        except (ReceiptLogError, sqlite3.Error) as exc:
            log.error("receipt log: %d leaves are logged but could not be signed now: %s",
                      len(good), exc)
            return {leaf.token: None for leaf in good}
        return {leaf.token: receipt for leaf, receipt in zip(good, made, strict=True)}
