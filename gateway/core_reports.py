"""Reports: what a provider tells the gateway about the tasks it holds.

The provider-side rules: outcomes (:meth:`ReportRules.results`, settled and forwarded to the
client, or refused when they do not answer their assignment), progress events, heartbeats
(cumulative usage, capped by what the gateway observed, priced, and tasks over budget stopped),
and reports on tasks a provider does not hold (dropped, counted). Split out of
:class:`gateway.hub.Hub` (a mixin: the rules, split by concern; the state lives in the owners the
hub holds) so the hub keeps the client side and placement.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from gateway import chunks
from gateway import protocol as p
from gateway.billing import Grant, cap_usage, is_free, price_micro
from gateway.outcomes import Failing, failure, outcome_digest, settled_leaf, unasked_cancel
from gateway.registry import ProviderConn
from gateway.tasks import ANSWERED, Task, TaskState

log = logging.getLogger(__name__)


class ReportRules:
    """Reports: a provider's results, events and heartbeats, and budget stops."""

    def results(self, conn: ProviderConn, msg: p.Results, buffers: Sequence[memoryview]) -> None:
        """A provider's outcomes: settle them, forward each to its session (a frame each).

        Only the provider a task is assigned to may report it, once; its usage is believed only
        up to what the gateway observed (:meth:`_observed`) before it is priced."""
        groups = p.split_buffers([r.nb for r in msg.results], buffers)
        mine: list[tuple[Task, p.Result, list[memoryview]]] = []
        fails: list[Failing] = []
        for result, bufs in zip(msg.results, groups, strict=True):
            if result.verification is not None:  # the gateway's to say, never a provider's
                result = replace(result, verification=None)
            task = self.tasks.get(result.key)
            if task is None or task.provider != conn.id or task.task_id not in conn.running:
                # not its task, or a repeat (the first report counts)
                self._dropped("result_not_assigned", result.key, conn)
                continue
            if (result.refs and task.task_id not in self.unparked
                    and task.state is TaskState.RUNNING):
                why = self._park(task, conn, result, bufs)
                if why is None:
                    continue  # handled once its bytes reached the client
                conn.running.discard(task.task_id)
                self._bad_result(task, conn, why, fails)
                continue
            conn.running.discard(task.task_id)
            if result.status == "cancelled" and task.state is TaskState.RUNNING:
                result = unasked_cancel(result, task.key, conn.id)  # nobody asked: it failed
            bad = chunks.result_problem(task.spec.items, result)
            if bad is not None and task.state is TaskState.RUNNING:
                self._bad_result(task, conn, bad, fails)
                continue
            conn.served += 1
            if result.usage:
                task.usage = self._observed(task, conn, result.usage)
                self.scheduler.observe(task.usage.get("wall_seconds", 0.0))
            if self.verifier.voting(task) and task.state is TaskState.RUNNING:
                self._vote(task, conn, result, bufs)
                continue
            if task.spec.proof is not None and task.state is TaskState.RUNNING:
                self._proof_result(task, conn, result, bufs)  # paid once its proof verifies
                continue
            if self._spot_takes(task, conn, result, bufs):
                continue
            mine.append((task, result, bufs))
        for task, _, _ in mine:
            if task.state is TaskState.STOPPING:  # settled (or refunded) and answered already
                self._end(task)
        mine = [m for m in mine if m[0].billable]
        funded = [t for t, _, _ in mine if t.escrow_micro]
        charges = dict(zip(map(id, funded), self.billing.settle(
            [(t.bill_id, conn.account, t.usage, conn.ad.prices, True) for t in funded]),
            strict=True))
        out: dict[str, list[tuple[p.Result, list[memoryview]]]] = defaultdict(list)
        for task, result, bufs in mine:
            charge = charges.get(id(task))
            cost = charge.cost if charge else 0.0
            if task.state is TaskState.CANCELLING:  # the client has its answer; the final bill
                self._end(task)
                if charge is not None:  # what the cancelled task cost in the end
                    self._send_events(task, p.Event(key=task.key, kind="usage",
                                                    usage=task.usage, cost=cost))
                continue
            self._end(task, TaskState(result.status))
            self._graph_outcome(task, conn, result)
            answer = replace(result, key=task.key, provider=conn.id, usage=task.usage, cost=cost,
                             verification=self._spot_verification(task))
            if charge is None:
                out[task.session].append((answer, bufs))
                continue
            digest = outcome_digest(result, bufs)
            self._send_logged(task.session, answer, bufs, settled_leaf(
                task, charge, digest, [(conn.account, digest, task.usage, conn.ad.prices, charge)],
                chunks.item_hashes(result, bufs)), [task.bill_id])
        for session_id, items in out.items():
            session = self.sessions.get(session_id)
            if session is not None:
                self._send_results(session, items)
        self._fail_many(fails)
        self.dispatch()

    def _bad_result(self, task: Task, conn: ProviderConn, why: str,
                    fails: list[Failing]) -> None:
        """A result that does not answer its assignment (a chunk with another item count):
        refused, counted against the provider, and the task runs elsewhere (it is paid up to
        its last heartbeat, as for a provider that vanished)."""
        self._dropped("result_mismatch", task.task_id, conn)
        self.standing.lost(conn.account, f"answered task {task.key} wrongly: {why}")
        self._retry_or_fail(task, conn, f"provider {conn.id} answered wrongly ({why})", fails)

    def _observed(self, task: Task, conn: ProviderConn, usage: dict) -> dict[str, float]:
        """A provider's cumulative usage report, capped by what the gateway saw: the wall time
        since it sent the assignment times the resources the task was granted there."""
        wall = 0.0 if task.assigned_at is None else time.monotonic() - task.assigned_at
        return cap_usage(usage, Grant.of(task.spec, conn.ad), wall)

    def _dropped(self, reason: str, key: str, conn: ProviderConn) -> None:
        """A provider reported on a task it does not hold: ignored, counted in /metrics."""
        self.counters.dropped[reason] += 1  # counted; logged quietly: a flood must not fill logs
        log.debug("dropping %s for %.80s from %s", reason.replace("_", " "), key, conn.id)

    def events(self, conn: ProviderConn, msg: p.Events) -> None:
        now = time.monotonic()
        for event in msg.events:
            task = self.tasks.get(event.key)
            if task is None or task.provider != conn.id:
                self._dropped("event_not_assigned", event.key, conn)
                continue
            if task.state in ANSWERED:
                continue
            task.lease_until = now + self.limits.lease_seconds
            if event.kind == "running" and task.started is None:
                task.started = now
            self._send_events(task, replace(event, key=task.key, provider=conn.id))

    def heartbeat(self, conn: ProviderConn, msg: p.Heartbeat) -> None:
        """Cumulative usage of running tasks: settle it, show it, stop what is over budget.

        Usage is capped by what the gateway observed before it is priced. A replica whose vote is
        open moves no tokens: its usage is recorded and its budget enforced, and it is paid only
        if its result agrees with the decision."""
        conn.load = dict(msg.load)
        live: list[Task] = []
        for task_id, usage in msg.usage.items():
            task = self.tasks.get(task_id)
            if task is None or task.provider != conn.id:
                self._dropped("usage_not_assigned", task_id, conn)
                continue
            if task.state is not TaskState.RUNNING or not usage:  # a cancelled one's final bill
                continue  # comes with its result
            task.usage = self._observed(task, conn, usage)
            live.append(task)
        voting = [t for t in live if self.verifier.voting(t) or t.spec.spot_check]
        paying = [t for t in live if t.escrow_micro and not is_free(conn.ad)
                  and not self.verifier.voting(t) and not t.spec.spot_check
                  and t.spec.proof is None]  # paid once decided (vote, check, proof)
        charges = dict(zip(map(id, paying), self.billing.settle(
            [(t.bill_id, conn.account, t.usage, conn.ad.prices, False) for t in paying]),
            strict=True))
        for task in live:
            charge = charges.get(id(task))
            self._send_events(task, p.Event(key=task.key, kind="usage", usage=task.usage,
                                            cost=charge.cost if charge else None))
            if charge is not None and charge.spent:
                self._stop_over_budget(task, conn, charge.cost)
        for task in voting:
            if task.escrow_micro and price_micro(task.usage, conn.ad.prices) >= task.escrow_micro:
                if task.spec.spot_check:
                    self._spot_over_budget(task)
                else:
                    self._stop_vote_over_budget(task)
        for task in live:
            if task.spec.proof is not None:
                self._proof_over_budget(task, conn.ad.prices)

    def _stop_over_budget(self, task: Task, conn: ProviderConn, cost: float) -> None:
        """The escrow is spent: kill the task and fail it, settled for good at the escrow (work
        past it is not paid), with the receipt of that settlement."""
        self._answered(task, TaskState.STOPPING, TaskState.ERROR)
        self.send_cancel(conn.id, [task])
        charge = self.billing.settle([(task.bill_id, conn.account, task.usage, conn.ad.prices,
                                       True)])[0]
        if charge is not None:
            cost = charge.cost
        what = (f"its budget of {task.spec.budget:g} tokens" if task.spec.budget is not None
                else "its escrow (the gateway's default; pass budget= to allow more)")
        message = f"task {task.key} was stopped after using {what}; charged {cost:g} tokens"
        result = replace(failure(task.key, p.ErrorCode.BUDGET, message, "BudgetExceeded"),
                         cost=cost, usage=task.usage)
        if charge is None:
            self._send_results_to(task.session, [(result, [])])
        else:
            self._send_logged(task.session, result, [], settled_leaf(
                task, charge, "budget-exceeded",
                [(conn.account, "budget-exceeded", task.usage, conn.ad.prices, charge)]),
                [task.bill_id])
