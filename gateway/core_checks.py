"""Spot checks: carrying out what :mod:`gateway.spot_check` decides.

Rules: a spot-checked task's result is either delivered at once (not drawn) or held while check
tasks run on providers of other accounts; money moves only once the case is decided (the winner
and honest checkers are paid in one settlement with one receipt-log leaf, the out-voted get
their escrow back and are caught). Part of :class:`gateway.hub.Hub` (a mixin).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from gateway import protocol as p
from gateway.outcomes import failure, outcome_digest, vote_leaf
from gateway.registry import ProviderConn
from gateway.scheduler import why_ineligible
from gateway.spot_check import REPLICA_BASE, Case, Verdict, check_payload, judge
from gateway.tasks import Task, TaskState
from gateway.verify import Ballot, Standing

log = logging.getLogger(__name__)


class CheckRules:
    """Spot checks: hold, check, decide, pay, catch."""

    def _spot_takes(self, task: Task, conn: ProviderConn, result: p.Result,
                    bufs: list[memoryview]) -> bool:
        """A provider's result that spot checks own (a check task's, or a drawn one): handled
        here, True. False: the ordinary path delivers it (unchecked, remembered)."""
        if task.state is not TaskState.RUNNING:
            return False
        case = self.spot.cases.pop(task.task_id, None)
        if case is None and (task.spec.spot_check <= 0 or result.status != "finished"):
            self.spot.blobs.pop(task.task_id, None)
            return False  # the hot path: no spot check, nothing hashed here
        ballot = Ballot(task, conn.id, conn.account, outcome_digest(result, bufs), result,
                        list(bufs), dict(conn.ad.prices))
        if case is not None:
            self._end(task, TaskState(result.status))
            self.spot.checks_run += 1
            if case.target is not None:
                case.verdicts.append((ballot, case.target))
            else:
                case.ballots.append(ballot)
            self._spot_next(case)
            return True
        blob = self.spot.blobs.pop(task.task_id, None)
        if not self.spot.draw(task, conn.account):
            self.spot.remember(task, ballot, blob)
            return False
        self._end(task, TaskState.FINISHED)
        self._spot_next(Case(task, [ballot], blob))
        return True

    def _spot_next(self, case: Case) -> None:
        """Run what the case needs next, or carry out its verdict."""
        step = judge(case)
        if isinstance(step, Verdict):
            self._spot_decide(case, step)
        elif not self._spot_launch(case, step):
            self._spot_give_up(case, "no provider of another account could check it")

    def _spot_launch(self, case: Case, kind: str) -> bool:
        """A check task (``kind`` "check": the check function; "run": a full re-run) on a
        provider of an account that has not run or checked this task yet."""
        first = case.task
        case.made += 1
        case.target = case.ballots[-1] if kind == "check" else None
        if case.target is not None:
            payload = check_payload(case.target.buffers, first.payload)
            spec = replace(first.spec, func=first.spec.check or "", nb=len(payload))
            blob = case.check_blob
        else:
            spec, blob, payload = first.spec, first.func_blob, first.payload
        task = Task(spec, first.account, first.session, blob, payload,
                    replica=REPLICA_BASE + case.made)
        task.avoid = case.accounts(runs_only=kind == "check")
        task.tried = set(task.avoid)
        if not any(c.account not in task.avoid and why_ineligible(spec, task.account, c) is None
                   for c in self.registry):
            return False
        why = self.funding.fund(first.session, [task])[0]
        if why is not None:
            log.info("spot check of %s not funded: %s", first.key, why)
            return False
        case.running = task
        self.spot.cases[task.task_id] = case
        self._admit(task)
        self.scheduler.enqueue(task, front=True)
        self.dispatch()
        return True

    def _spot_cancel(self, task_id: str, refunds: list[str]) -> bool:
        """The client cancelled a task whose result is held for its check: the check stops,
        nobody is paid (every escrow of the case joins ``refunds``), nobody is judged."""
        case = next((c for c in self.spot.cases.values()
                     if c.task.task_id == task_id and not c.delivered), None)
        if case is None or case.running is None:
            return False
        self.spot.cases.pop(case.running.task_id, None)
        self._stop_replicas([case.running], TaskState.CANCELLED)
        refunds += [b.task.bill_id for b in case.everyone() if b.task.escrow_micro]
        if case.running.escrow_micro:
            refunds.append(case.running.bill_id)
        return True

    def _spot_over_budget(self, task: Task) -> None:
        """A spot-checked task (or its check) used up its escrow before its result was
        decided: it stops unpaid (escrow back). The client's task fails with nothing charged;
        a check task's case gives up instead."""
        self._answered(task, TaskState.STOPPING, TaskState.ERROR)
        self.send_cancel(task.provider or "", [task])
        self.billing.refund([task.bill_id])
        case = self.spot.cases.pop(task.task_id, None)
        if case is not None:
            self._spot_give_up(case, "its check used up its escrow")
            return
        what = (f"its budget of {task.spec.budget:g} tokens" if task.spec.budget is not None
                else "its escrow (the gateway's default; pass budget= to allow more)")
        self._send_results_to(task.session, [(failure(
            task.key, p.ErrorCode.BUDGET, f"task {task.key} used up {what} before its result "
            f"could be checked; it was stopped, nothing was charged", "BudgetExceeded"), [])])

    def _spot_lost(self, task: Task) -> bool:
        """A check task failed for good (its providers lost, nowhere to run): its escrow goes
        back and its case gives up. False if ``task`` is not a check task."""
        case = self.spot.cases.pop(task.task_id, None)
        if case is None:
            return False
        if task.escrow_micro:
            self.billing.refund([task.bill_id])
        self._end(task, TaskState.ERROR)
        self._spot_give_up(case, "its check task could not run")
        return True

    def _spot_give_up(self, case: Case, why: str) -> None:
        """No check could decide: an undisputed claimed result is delivered (paid) as
        unchecked; a disputed one fails, nobody paid."""
        disputed = len(case.ballots) > 1 or bool(case.verdicts)
        if disputed:
            self._spot_decide(case, Verdict(None, [], case.everyone(), True), why)
        else:
            self._spot_decide(case, Verdict(case.claimed, [case.claimed], []), why)

    def _spot_decide(self, case: Case, verdict: Verdict, why: str = "") -> None:
        """Pay the winners, refund the out-voted and catch them, answer the client."""
        claimed, first = case.claimed, case.task
        settled = [b for b in verdict.paid if not (case.delivered and b is claimed)]
        refused = [b for b in verdict.unpaid if not (case.delivered and b is claimed)]
        self.billing.refund([b.task.bill_id for b in refused if b.task.escrow_micro])
        paid = [b for b in settled if b.task.escrow_micro]
        charges = self.billing.settle([(b.task.bill_id, b.provider_account, b.task.usage,
                                        b.prices, True) for b in paid])
        checkers = case.everyone()[1:]
        for b in verdict.paid if checkers else ():
            standing = self.verifier.standing.setdefault(b.provider_account, Standing())
            standing.valid += 1
            standing.run += 1
        for b in verdict.unpaid if not verdict.failed else ():
            self._spot_caught(b.provider_account, first.session, first.key)
        info = {"kind": "spot_check", "checked": bool(checkers),
                "by": [b.provider_id for b in checkers],
                "passed": None if not checkers else any(b is claimed for b in verdict.paid),
                "runs": len(case.ballots), "checks": len(case.verdicts),
                "claimed_by": claimed.provider_id,
                "caught": [] if verdict.failed else [b.provider_id for b in verdict.unpaid]}
        if why:
            info["note"] = why
        if case.delivered:
            info["late"] = True
        if verdict.failed:
            info["passed"] = False
            if not case.delivered:
                self._send_results_to(first.session, [(replace(failure(
                    first.key, p.ErrorCode.VERIFY, f"the runs of {first.key} disagreed and "
                    f"no two agreed ({why or 'spot check'}); no result is trusted",
                    "VerificationFailed"), verification=info), [])])
            return
        win = verdict.winner
        assert win is not None
        cost = sum(c.cost for c in charges if c is not None)
        if case.delivered:  # the client has the claimed result: it is told the outcome
            answer, bufs = p.Result(key=first.key, status="finished", cost=cost,
                                    provider=win.provider_id, verification=info), []
        else:
            answer = replace(win.result, key=first.key, provider=win.provider_id,
                             usage=win.task.usage, cost=cost, verification=info)
            bufs = win.buffers
        if not any(c is not None for c in charges):
            self._send_results_to(first.session, [(answer, bufs)])
            return
        pairs = list(zip(paid, charges, strict=True))
        self._send_logged(first.session, answer, bufs, vote_leaf(win, refused, pairs),
                          [b.task.bill_id for b in paid])

    def _spot_caught(self, account: str, session: str, key: str) -> None:
        """``account`` lost a check: its reputation resets, it is benched sooner, and its
        unchecked results in this session are checked now."""
        self.spot.caught += 1
        standing = self.verifier.standing.setdefault(account, Standing())
        standing.invalid += 1
        standing.valid = standing.run = 0
        self.standing.lost(account, f"failed a spot check of task {key}")
        log.warning("provider account %s failed a spot check of %s", account[:16], key)
        for case in self.spot.suspect(session, account):
            self._spot_next(case)

    def _spot_verification(self, task: Task) -> dict | None:
        """What an unchecked result's ``verification`` says."""
        if task.spec.spot_check <= 0:
            return None
        return {"kind": "spot_check", "checked": False, "rate": task.spec.spot_check}
