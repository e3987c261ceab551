"""Funding: which tasks hold escrow, how much, and where a task's escrow lets it run.

The money rule at submit: a task that can only land on free providers holds no escrow (and
writes nothing to the ledger); one that may land on a priced provider holds its escrow, or, if the
account cannot fund it and a free provider fits, runs on free ones only. And at placement: a
priced provider takes a task only if its escrow pays for one billing interval there. One owner
also for what a restart already settled (resubmissions are charged nothing again).
"""

from __future__ import annotations

from gateway.billing import Billing, Unfundable, is_free, why_unaffordable
from gateway.ledger import InsufficientFunds
from gateway.registry import ProviderConn, Registry
from gateway.scheduler import why_ineligible
from gateway.tasks import Task


class Funding:
    """Escrow plans for the tasks of one gateway (see the module docstring)."""

    def __init__(self, billing: Billing, registry: Registry) -> None:
        self.billing = billing
        self.registry = registry
        #: Per session a restart cut: its task ids settled for good before the restart (read
        #: from the ledger by the shell at attach); resubmitted, they are charged nothing.
        self._prepaid_ids: dict[str, set[str]] = {}
        #: Plans by what decides them, valid while nobody joins or leaves (a submit batch of a
        #: million tasks with one shape looks at the providers once, not once per batch).
        self._plans: dict[tuple, str] = {}
        self._plans_version = -1

    def settled_before(self, session_id: str, task_ids: set[str]) -> None:
        """A session a restart cut: these of its tasks were paid for already."""
        if task_ids:
            self._prepaid_ids[session_id] = set(task_ids)

    def fund(self, session_id: str, tasks: list[Task]) -> list[Exception | None]:
        """Hold escrow for accepted tasks by the money rule, in one transaction; returns None or
        why, per task. A task that can only land on free providers holds none (and writes
        nothing to the ledger); one that may land on a priced provider holds its escrow, or,
        if the account cannot fund it and a free provider fits, runs on free ones only. A task
        already settled for good before a gateway restart lost its result holds none either."""
        out: list[Exception | None] = [None] * len(tasks)
        prepaid = self._prepaid(session_id, tasks)
        plans: dict[tuple, str | Exception] = {}
        holding: dict[int, str] = {}  # index -> its plan, "hold" or "try"
        for i, task in enumerate(tasks):
            if prepaid and {task.task_id, *(s.task_id for s in task.siblings)} & prepaid:
                task.prepaid = True
                continue
            spec, escrow = task.spec, self.billing.escrow_for(task.spec)
            sig = (tuple(spec.providers or ()), spec.runtime,
                   tuple(sorted(spec.resources.items())), spec.max_price, escrow,
                   tuple(spec.packages))
            plan = plans.get(sig)
            if plan is None:
                plan = plans[sig] = self._known_plan(task, escrow, sig)
            if isinstance(plan, Exception):
                out[i] = plan
            elif plan != "free":
                task.escrow_micro = escrow
                holding[i] = plan
        holds = self.billing.hold([(tasks[i].bill_id, tasks[i].account, tasks[i].spec)
                                   for i in holding])
        for (i, plan), why in zip(holding.items(), holds, strict=True):
            if why is None:
                continue
            tasks[i].escrow_micro = 0  # unfunded: runs on free providers only, or not at all
            free_only = plan == "try" and isinstance(why, InsufficientFunds)
            if not free_only or tasks[i].siblings:  # replicas are funded all alike, or refused
                out[i] = why
        return out

    def _known_plan(self, task: Task, escrow: int, sig: tuple) -> str | Exception:
        """:meth:`_plan`, remembered until the set of providers changes (per account: a
        provider's ``allow`` list makes eligibility depend on it)."""
        if self._plans_version != self.registry.version or len(self._plans) > 10_000:
            self._plans.clear()
            self._plans_version = self.registry.version
        key = (*sig, task.account)
        plan = self._plans.get(key)
        if plan is None:
            found = self._plan(task, escrow)
            if isinstance(found, Exception):  # its message names this task: never reused
                return found
            plan = self._plans[key] = found
        return plan

    def _plan(self, task: Task, escrow: int) -> str | Exception:
        """``"free"`` (hold nothing), ``"hold"`` (escrow needed), ``"try"`` (hold if the account
        can, else run free-only), or why no online provider that fits would ever be paid."""
        spec = task.spec
        fits = [c for c in self.registry if why_ineligible(spec, task.account, c) is None]
        if not fits:  # nobody online yet: hold if it can, so a priced provider may take it
            return "try" if escrow else "free"
        paid = any(not is_free(c.ad) and why_unaffordable(escrow, spec, c.ad) is None
                   for c in fits)
        free = any(is_free(c.ad) for c in fits)
        if paid:
            return "try" if free else "hold"
        if free:
            return "free"
        reasons = "; ".join(f"{c.id}: {why_unaffordable(escrow, spec, c.ad)}" for c in fits[:5])
        return Unfundable(f"task {spec.key} would run only on priced providers, and none of them "
                          f"could be paid from it ({reasons}); raise budget= (or give max_price= "
                          f"with timeout=), ask for cpus >= 1, or pin a free provider")

    def _prepaid(self, session_id: str, tasks: list[Task]) -> set[str]:
        """Task ids of this batch whose earlier submission was settled for good (a restart lost
        the result, the client resubmitted it): known for sessions a restart cut."""
        settled = self._prepaid_ids.get(session_id)
        if not settled or not tasks:
            return set()
        return {t.task_id for t in tasks} & settled

    def fundable_here(self, task: Task) -> bool:
        """Whether some provider online that fits the task would also take it for its escrow."""
        return any(why_ineligible(task.spec, task.account, c) is None and self.may_place(task, c)
                   for c in self.registry)

    def may_place(self, task: Task, conn: ProviderConn) -> bool:
        """The scheduler's money rule: a priced provider takes a task only if its escrow pays
        for one billing interval there (a prepaid rerun pays nobody and goes anywhere)."""
        return task.prepaid or why_unaffordable(task.escrow_micro, task.spec, conn.ad) is None
