"""Upkeep: the periodic tick; deadlines that came due, sessions given up, tasks nobody can take.

Rules of the shell's one-second tick: leases, timeouts and cancel graces from the deadline heap,
abandoned sessions, and a bounded slice of pending tasks re-checked for placeability. Never a pass
over every task. Part of :class:`gateway.hub.Hub` (a mixin).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from gateway import protocol as p
from gateway.deadlines import TIMEOUT_GRACE, Due, Kind
from gateway.outcomes import (
    Failing,
)
from gateway.registry import ProviderConn
from gateway.scheduler import no_match_message
from gateway.tasks import ANSWERED, Task, TaskState

log = logging.getLogger(__name__)


#: A task's ``timeout`` clock starts when its provider says it runs, but at most this long after
#: the assignment (a provider cannot stretch a deadline by never saying so).
START_GRACE = 10.0
#: Pending tasks re-checked for placeability per sweep tick: bounds one tick's work.
RECHECK_SLICE = 5_000


class UpkeepRules:
    """The periodic tick: deadlines due, sessions given up, tasks nobody can take."""

    def sweep(self, now: float | None = None) -> None:
        """Periodic upkeep (each second): give up abandoned sessions, act on the deadlines that
        came due, and re-check a slice of the tasks a departure may have left unplaceable. Never
        a pass over every task."""
        now = time.monotonic() if now is None else now
        for session in list(self.sessions.values()):
            if session.expired(now):
                log.warning("session %s gone for good; cancelling its tasks", session.id)
                self.cancel(session, self.tasks.keys_of_session(session.id))
                del self.sessions[session.id]
        self._expire(now)
        self._recheck_slice(now)

    def _expire(self, now: float) -> None:
        """Deadlines that came due: take back what a provider held too long."""
        refunds: list[str] = []
        fails: list[Failing] = []
        cancels: dict[str, list[str]] = defaultdict(list)
        for due in self.deadlines.due(now):
            task = self.tasks.get(due.task_id)
            if task is None or task.assignment != due.assignment:
                continue  # ended, or assigned again since: a stale entry
            conn = self.registry.get(task.provider or "")
            if conn is None or task.task_id not in conn.running:
                continue
            later = self._still_due_at(task, due)
            if later > now:
                self.deadlines.at(later, task.task_id, task.assignment, due.kind)
                continue
            if task.state in ANSWERED:
                if due.kind is Kind.TIMEOUT:
                    continue  # a cancelled task's slot is governed by the cancel grace
                conn.running.discard(task.task_id)
                if task.state is TaskState.CANCELLING and task.escrow_micro:
                    refunds.append(task.bill_id)  # paid up to its last reported usage
                self._end(task)
                self.standing.lost(conn.account, "never reported a cancelled task", now)
                continue
            conn.running.discard(task.task_id)
            cancels[conn.id].append(task.task_id)
            self._take_back(task, conn, due.kind, fails)
        for conn_id, ids in cancels.items():
            conn = self.registry.get(conn_id)
            if conn is not None:  # an honest but slow provider stops it
                conn.send(p.encode(p.Cancel(keys=ids)))
        if refunds:
            self.billing.refund(refunds)
        self._fail_many(fails)
        if refunds or fails or cancels:
            self.dispatch()

    def _still_due_at(self, task: Task, due: Due) -> float:
        """When ``due`` really falls due now that the task may have moved on (a renewed lease,
        a late start); at or before now if it has fallen due."""
        if due.kind is Kind.LEASE:
            return task.lease_until
        if due.kind is Kind.TIMEOUT and task.spec.timeout is not None:
            assigned = task.assigned_at or due.when
            start = min(task.started or assigned, assigned + START_GRACE)
            return start + task.spec.timeout + TIMEOUT_GRACE
        return due.when

    def _take_back(self, task: Task, conn: ProviderConn, kind: Kind,
                   fails: list[Failing]) -> None:
        """A provider held a task past its lease or its timeout: the account is charged a loss;
        a lapsed lease runs the task elsewhere, a timeout fails it with ``TimeoutError``."""
        if kind is Kind.TIMEOUT:
            self.standing.lost(conn.account, "held a task past its timeout")
            msg = (f"task {task.key} ran past its timeout of {task.spec.timeout:g} s; provider "
                   f"{conn.id} did not report it, so the gateway took it back")
            fails.append((task, p.ErrorCode.TIMEOUT, msg, "TimeoutError"))  # a replica: its vote
            return
        self.standing.lost(conn.account, "let a lease lapse")
        self._retry_or_fail(task, conn, f"provider {conn.id} stopped reporting the task for "
                                        f"{self.limits.lease_seconds:g} s", fails)

    def _recheck_after(self, seconds: float) -> None:
        at = time.monotonic() + seconds
        if self._recheck_at is None or at < self._recheck_at:
            self._recheck_at = at

    def _recheck_slice(self, now: float) -> None:
        """Fail, a slice a tick, pending tasks that no online provider can take and that have
        waited out their grace (a provider may come back for them)."""
        if not self._recheck and self._recheck_at is not None and now >= self._recheck_at:
            self._recheck_at = None
            self._recheck = self.scheduler.pending_tasks()
            self._recheck.reverse()  # popped from the end: oldest first
        if not self._recheck:
            return
        fails: list[Failing] = []
        later: float | None = None
        for _ in range(min(RECHECK_SLICE, len(self._recheck))):
            task = self._recheck.pop()
            if task.state is not TaskState.PENDING or not self.scheduler.queued(task):
                continue
            why = self._unplaceable(task, now)
            if why is None:
                continue
            if isinstance(why, float):
                later = why if later is None else min(later, why)
                continue
            self.scheduler.discard(task)
            fails.append(why)
        if later is not None:
            self._recheck_after(max(1.0, later - now))
        self._fail_many(fails)

    def _unplaceable(self, task: Task, now: float) -> Failing | float | None:
        """None if a provider online can take the task; the time to look again if it may still
        wait for one; else how it fails: ``ProviderLost`` if providers that ran it left,
        ``NoMatchingProvider`` if none ever could."""
        online = len(self.registry)
        why = None if online else "no provider is online"
        if online:
            why = no_match_message(task.spec, task.account, self.registry)
            if why is None and not self.funding.fundable_here(task):
                why = (f"task {task.key} holds too little escrow for the priced providers online "
                       f"(budget=0, cpus=0 or a budget under one billing interval run on free "
                       f"providers only), and no free provider that fits is online")
            if why is None:
                return None
        wait = self.limits.rejoin_grace if online else self.limits.no_provider_wait
        since = max(task.created, self._left_at if online else self._empty_since)
        if now < since + wait:
            return since + wait
        if task.attempts:
            return (task, p.ErrorCode.LOST,
                    f"the providers that ran task {task.key} left, and after {wait:.0f} s "
                    f"{why}; start one (or wait for yours) and submit again", "ProviderLost")
        if not online:
            why = (f"no provider has been online for {wait:g} s; start one with "
                   f"`decompute-provider`")
        return (task, p.ErrorCode.NO_MATCH, why, "NoMatchingProvider")
