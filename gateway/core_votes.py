"""Votes: carrying out what a redundancy vote decided.

Rules for ``redundancy=k`` tasks: a replica's outcome is a ballot; money moves only once the
vote (:mod:`gateway.verify`) is decided, the agreeing replicas are paid, the others are stopped
unpaid. Part of :class:`gateway.hub.Hub` (a mixin: the rules, split by concern; the state lives in
the owners the hub holds).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace

from gateway import protocol as p
from gateway.outcomes import (
    failure,
    outcome_digest,
    vote_leaf,
)
from gateway.registry import ProviderConn
from gateway.tasks import Task, TaskState
from gateway.verify import Ballot, Decision

log = logging.getLogger(__name__)


class VoteRules:
    """Votes: carrying out what a redundancy vote decided."""

    def _stop_vote_over_budget(self, task: Task) -> None:
        """A replica used up its escrow before the vote was decided: the whole task stops, and,
        as no result was ever compared, nobody is paid and every replica's escrow goes back."""
        what = (f"its budget of {task.spec.budget:g} tokens" if task.spec.budget is not None
                else "its escrow (the gateway's default; pass budget= to allow more)")
        self._abandon_vote(task, failure(
            task.key, p.ErrorCode.BUDGET, f"a replica of task {task.key} used up {what} before "
            f"the replicas could be compared; the task was stopped, nothing was charged",
            "BudgetExceeded"))

    def _abandon_vote(self, task: Task, answer: p.Result) -> None:
        """Close ``task``'s vote undecided: its open replicas stop (or end, if waiting), every
        escrow of it goes back (ballots too), and the client gets ``answer`` once."""
        vote = self.verifier.of.get(task.task_id)
        self.refereeing.pop(vote.id if vote is not None else "", None)
        replicas, ballots = self.verifier.abandon(task)
        self._stop_replicas(replicas, TaskState.ERROR)
        self.billing.refund([t.bill_id for t in replicas if t.escrow_micro]
                            + [b.task.bill_id for b in ballots if b.task.escrow_micro])
        self._send_results_to(task.session, [(answer, [])])

    def _stop_replicas(self, replicas: list[Task], ending: TaskState) -> None:
        """Replicas a vote no longer needs: waiting ones end (``ending``), running ones stop on
        their providers, unpaid (their escrows are the caller's to return)."""
        by_provider: dict[str, list[Task]] = defaultdict(list)
        for replica in replicas:
            if replica.state is TaskState.PENDING:
                self.scheduler.discard(replica)
                self._end(replica, ending)
            elif replica.state is TaskState.RUNNING:
                self._answered(replica, TaskState.STOPPING, ending)
                by_provider[replica.provider or ""].append(replica)
        for provider_id, tasks in by_provider.items():
            self.send_cancel(provider_id, tasks)

    def _vote(self, task: Task, conn: ProviderConn, result: p.Result,
              bufs: list[memoryview]) -> None:
        """A replica's outcome is a ballot; the vote decides what the client gets and who is
        paid. Nothing reaches the client before a majority (or a trusted provider) agrees."""
        if task.spec.refereed:  # judged by checkpoints, not by result hashes
            self._refereed_ballot(task, conn, result, bufs)
            return
        digest = outcome_digest(result, bufs)
        self._end(task, TaskState(result.status))
        decision = self.verifier.cast(Ballot(task, conn.id, conn.account, digest, result, bufs,
                                             dict(conn.ad.prices)))
        self._apply(decision, task)

    def _replica_lost(self, task: Task, message: str) -> None:
        if task.spec.refereed:
            self._refereed_lost(task, message)
            return
        self.billing.refund([task.bill_id])
        self._end(task, TaskState.ERROR)
        decision = self.verifier.lost(task)
        if decision.failed and not decision.unpaid:  # every replica was lost
            self._send_failure(task, p.ErrorCode.LOST, message, "ProviderLost")
        else:
            self._apply(decision, task)

    def _apply(self, decision: Decision, task: Task) -> None:
        """Carry out a vote's decision. Money moves only here, once the vote is decided: the
        agreeing replicas are paid (final settlements at their capped usage), the out-voted and
        the cancelled ones get nothing (their escrows go back), and the client is told the sum,
        exactly what its balance lost."""
        # decided: the other replicas are not needed, nor paid
        self._stop_replicas(decision.cancel, TaskState.CANCELLED)
        self.billing.refund([t.bill_id for t in decision.cancel]
                            + [b.task.bill_id for b in decision.unpaid])
        paid = [b for b in decision.paid if b.task.escrow_micro]
        charges = self.billing.settle([
            (b.task.bill_id, b.provider_account, b.task.usage, b.prices, True) for b in paid])
        if decision.failed:
            digests = sorted({b.digest[:12] for b in decision.unpaid})
            self._send_failure(task, p.ErrorCode.VERIFY,
                               f"the {len(decision.unpaid)} replicas of {task.key} disagreed "
                               f"(result hashes {', '.join(digests)}); no result is trusted",
                               "VerificationFailed")
        win = decision.accepted
        if win is None:
            return
        charge = next((c for b, c in zip(paid, charges, strict=True) if b is win), None)
        cost = sum(c.cost for c in charges if c is not None)
        answer = replace(win.result, key=task.key, provider=win.provider_id,
                         usage=win.task.usage, cost=cost, verification={
                             "kind": "redundancy", "checked": True, "passed": True,
                             "agreed": [b.provider_id for b in decision.paid],
                             "outvoted": [b.provider_id for b in decision.unpaid]})
        if charge is None:
            self._send_results_to(task.session, [(answer, win.buffers)])
        else:
            self._send_logged(task.session, answer, win.buffers, vote_leaf(
                win, decision.unpaid, list(zip(paid, charges, strict=True))),
                [b.task.bill_id for b in paid])

    def _send_failure(self, task: Task, code: p.ErrorCode, message: str, type_: str) -> None:
        self._send_results_to(task.session, [(failure(task.key, code, message, type_), [])])
