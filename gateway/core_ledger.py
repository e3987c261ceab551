"""The core's side of the ledger: the failure boundary, results waiting for receipts.

Rules where the core meets the accounting worker and its own bugs: a paid result waits for its
leaf; a group commit's answer releases it, and an escrow the ledger failed is undone to what the
disk has, closed, and its task failed; a handler that raises fails the tasks it concerned. Part of
:class:`gateway.hub.Hub` (a mixin).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from gateway import protocol as p
from gateway.billing import (
    Settled,
)
from gateway.journal import Committed
from gateway.outcomes import (
    Failing,
    ledger_failure,
)
from gateway.tasks import ANSWERED, TaskState

log = logging.getLogger(__name__)


class LedgerRules:
    """The core's side of the ledger: the failure boundary, results waiting for receipts."""

    def contain(self, what: str, task_ids: Iterable[str], react: Callable[..., object],
                *args: object) -> None:
        """Run one handler behind the core's failure boundary: a bug (an exception) while
        handling a message fails the tasks it concerned, returns their escrow and tells their
        clients, instead of leaving them half-changed; every other task and peer is served on.
        """
        try:
            react(*args)
        except Exception as exc:
            self.counters.refused[p.ErrorCode.INTERNAL.value] += 1
            log.exception("internal error handling %s", what)
            self._fail_after_bug(what, task_ids, exc)

    def _fail_after_bug(self, what: str, task_ids: Iterable[str], exc: Exception) -> None:
        """The open tasks a failed handler concerned end in error, each escrow returned."""
        failed: list[Failing] = []
        for task_id in dict.fromkeys(task_ids):
            task = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if task is None or task.state in ANSWERED:
                continue
            if task.state is TaskState.PENDING:
                self.scheduler.discard(task)
            conn = self.registry.get(task.provider or "")
            if task.state is TaskState.RUNNING and conn is not None:
                conn.running.discard(task.task_id)
                conn.send(p.encode(p.Cancel(keys=[task.task_id])))
            failed.append((task, p.ErrorCode.INTERNAL,
                           f"the gateway hit an internal error handling {what} for task "
                           f"{task.key} ({type(exc).__name__}: {exc}); the task was stopped and "
                           f"its escrow returned. Submit it again; if this repeats, tell the "
                           f"gateway's operator", "GatewayError"))
        try:
            self._fail_many(failed)
        except Exception:  # the boundary itself must hold: log, never raise into the shell
            log.exception("could not fail the tasks of a failed %s", what)

    def _send_logged(self, session_id: str, result: p.Result, bufs: list[memoryview],
                     settled: Settled, escrows: Sequence[str]) -> None:
        """Answer a final settlement once it is on disk as a leaf of the receipt log: the
        accounting worker commits it with its settlement and signs one tree head per group
        (:meth:`committed` sends the result with its receipt)."""
        token = self.billing.log_leaf(settled, escrows)
        if token is None:
            self._send_results_to(session_id, [(result, bufs)])
        else:
            self.delivery.wait_for_receipt(token, session_id, result, bufs, escrows)

    def committed(self, done: Committed) -> None:
        """The accounting worker committed a group: results go out with their receipts. An
        escrow the ledger failed is put back as the disk has it and closed; its task fails with
        the reason (nothing charged beyond what the disk recorded), and the gateway serves on."""
        accounts = self.billing.accounts
        for escrow_id, why in done.failed.items():
            accounts.undo(escrow_id)
            accounts.recover(escrow_id)
            self._ledger_failed(escrow_id, why)
        accounts.confirmed(done.seq)
        accounts.external(done.external)
        self.delivery.committed(done.receipts, done.failed, ledger_failure)
        self.transfers.committed(done.receipts, done.failed)

    def _ledger_failed(self, escrow_id: str, why: str) -> None:
        """A live task whose escrow the ledger failed: stop it and fail it (its result, if one
        is waiting for a receipt, is failed by :meth:`committed`)."""
        task = self.tasks.get(escrow_id.split("~", 1)[0])
        if task is None or task.bill_id != escrow_id or task.state in ANSWERED:
            return
        task.escrow_micro = 0  # closed by the recovery: nothing more to settle or refund
        if self.verifier.voting(task):  # one replica failed: the whole task fails, once
            self._abandon_vote(task, ledger_failure(task.key, why))
            return
        if task.state is TaskState.RUNNING:
            self._answered(task, TaskState.STOPPING, TaskState.ERROR)
            self.send_cancel(task.provider or "", [task])
            self._send_results_to(task.session, [(ledger_failure(task.key, why), [])])
            return
        self.scheduler.discard(task)
        self.verifier.forget(task)
        self._end(task, TaskState.ERROR)
        self._send_results_to(task.session, [(ledger_failure(task.key, why), [])])
