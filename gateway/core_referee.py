"""Refereed delegation: the gateway's verdict on two runs of a step-wise computation.

A refereed task (``TaskSpec.refereed``) runs as two replicas on providers of distinct accounts,
like ``redundancy=2``, but their results are judged by their checkpoint commitments
(:mod:`gateway.referee`), and the GATEWAY decides, so that neither provider nor the client (all
untrusted) can turn the verdict:

- both runs valid and their final hashes equal: the result is accepted, both are paid;
- final hashes differ: the gateway bisects the two hash lists to a segment they start alike and
  end differently, and orders a referee run of just that segment on a third account: the same
  function and args stream the client committed at submit, the segment and the agreed
  checkpoint's bytes put in by the gateway. The provider whose end hash matches the referee's
  is paid (with the referee) and its result goes to the client; the other is paid nothing and
  loses reputation. If neither matches, nobody is trusted: the task fails, nothing is charged
  for the disputants;
- a run that failed or broke the commitment format loses outright; the other is accepted (the
  model's assumption, as in Verde: at least one of the two providers is honest).

Money follows the verdict, as in a vote: nothing is settled while the dispute is open. Part of
:class:`gateway.hub.Hub` (a mixin); the disputes in progress live in ``hub.refereeing``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from gateway import protocol as p
from gateway import referee as rf
from gateway.outcomes import outcome_digest, vote_leaf
from gateway.registry import ProviderConn
from gateway.tasks import Task, TaskState
from gateway.verify import Ballot, Standing, Vote

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Refereeing:
    """One refereed task: its two runs' ballots and commitments, and the referee's segment."""

    vote: Vote
    runs: dict[int, tuple[Ballot, rf.Commitment | str]] = field(default_factory=dict)
    segment: int = 0  # the checkpoint index the referee's run ends at (0: no referee)
    referee: Task | None = None


class RefereeRules:
    """Refereed delegation: judging two runs by their checkpoints, and the referee."""

    def refereed_refusal(self, spec: p.TaskSpec, payload: list[memoryview]) -> p.Result | None:
        """A refereed spec whose steps, redundancy or payload cannot be judged is refused."""
        why = rf.spec_problem(spec.refereed, spec.redundancy, payload)
        if why is None:
            return None
        return p.Result(key=spec.key, status="error", code=p.ErrorCode.SCHEMA.value,
                        error=p.RemoteFailure(type="ValueError", module="builtins",
                                              message=f"task {spec.key}: {why}"))

    def _refereed_ballot(self, task: Task, conn: ProviderConn, result: p.Result,
                         bufs: list[memoryview]) -> None:
        """One run of a refereed task reported: record it; judge once both runs (or the
        referee) are in."""
        vote = self.verifier.of.pop(task.task_id)
        self._end(task, TaskState(result.status))
        ballot = Ballot(task, conn.id, conn.account, outcome_digest(result, bufs), result, bufs,
                        dict(conn.ad.prices))
        vote.ballots.append(ballot)
        case = self.refereeing.setdefault(vote.id, Refereeing(vote))
        first = vote.replicas[0]
        steps, every = task.spec.refereed["steps"], task.spec.refereed["every"]
        if task is case.referee:
            span = rf.checkpoints(0, steps, every)
            start, stop = span[case.segment - 1], span[case.segment]
            agreed = self._commitment(case, 0).hashes[case.segment - 1]
            made = rf.commitment(result.status, bufs, start, stop, every, agreed)
            self._referee_verdict(case, ballot, made)
            return
        made = rf.commitment(result.status, bufs, 0, steps, every, rf.start_hash(first.payload))
        if isinstance(made, str):
            log.warning("refereed task %s: run on %s is invalid: %s", task.key, conn.id, made)
        case.runs[task.replica] = (ballot, made)
        if len(case.runs) == 2:
            self._judge_runs(case)

    def _refereed_lost(self, task: Task, message: str) -> None:
        """A run (or the referee) was lost past its retries: with one run missing nothing can
        be compared, so the task fails and every escrow of it goes back; nobody is judged."""
        vote = self.verifier.of.get(task.task_id)
        if vote is None:
            return
        self._end(task, TaskState.ERROR)
        case = self.refereeing.get(vote.id) or Refereeing(vote)
        self._stop_replicas([t for t in vote.replicas if t is not task
                             and t.task_id in self.verifier.of], TaskState.ERROR)
        self.billing.refund([t.bill_id for t in vote.replicas if t.escrow_micro])
        self._close_case(case)
        self._send_failure(vote.replicas[0], p.ErrorCode.LOST,
                           f"refereed task {task.key}: a run was lost ({message}); nothing was"
                           " charged", "ProviderLost")

    def _commitment(self, case: Refereeing, replica: int) -> rf.Commitment:
        made = case.runs[replica][1]
        assert isinstance(made, rf.Commitment)
        return made

    def _judge_runs(self, case: Refereeing) -> None:
        (a, ca), (b, cb) = case.runs[0], case.runs[1]
        n = len(ca.hashes) - 1 if isinstance(ca, rf.Commitment) else 0
        runs = [a.provider_id, b.provider_id]
        if isinstance(ca, rf.Commitment) and isinstance(cb, rf.Commitment):
            if ca.hashes[-1] == cb.hashes[-1]:
                self._refereed_done(case, [a, b], [], a, {
                    "kind": "refereed", "agreed": True, "checkpoints": n, "referee": None,
                    "providers": runs})
                return
            self._order_referee(case, rf.divergence(ca.hashes, cb.hashes))
            return
        valid = [x for x, c in ((a, ca), (b, cb)) if isinstance(c, rf.Commitment)]
        if len(valid) == 1:
            loser = b if valid[0] is a else a
            self._refereed_done(case, valid, [loser], valid[0], {
                "kind": "refereed", "agreed": False, "referee": None, "providers": runs,
                "winner": valid[0].provider_id, "loser": loser.provider_id,
                "why": str(case.runs[loser.task.replica][1])[:300]})
        elif a.digest == b.digest and a.result.status != "finished":  # the same failure
            self._refereed_done(case, [a, b], [], a, {"kind": "refereed", "agreed": True,
                                                      "providers": runs})
        else:
            self._refereed_failed(case, [a, b], "both runs were invalid")

    def _order_referee(self, case: Refereeing, segment: int) -> None:
        """Run the disputed segment on a third account, from the agreed checkpoint."""
        first = case.vote.replicas[0]
        ca = self._commitment(case, 0)
        every = first.spec.refereed["every"]
        start, stop = ca.steps[segment - 1], ca.steps[segment]
        payload = list(first.payload)
        payload[rf.SEGMENT_BUF] = memoryview(rf.segment_bytes(start, stop, every))
        payload[rf.STATE_BUF] = memoryview(bytes(ca.states[segment - 1]))
        # the gateway picks the referee among all providers (the client's pins named the two
        # disputants), of a third account
        ref = Task(replace(first.spec, providers=None), first.account, first.session,
                   first.func_blob, payload, replica=2)
        ref.avoid |= {ballot.provider_account for ballot, _ in case.runs.values()}
        for task in case.vote.replicas:  # a cancel of the task reaches the referee too
            task.siblings.append(ref)
        ref.siblings = list(case.vote.replicas)
        case.vote.replicas.append(ref)
        case.segment, case.referee = segment, ref
        self.verifier.of[ref.task_id] = case.vote
        log.warning("refereed task %s: runs disagree from checkpoint %d (steps %d-%d); "
                    "ordering a referee", first.key, segment, start, stop - 1)
        why = self.funding.fund(first.session, [ref])[0]
        if why is not None:
            self.verifier.of.pop(ref.task_id, None)
            self._refereed_failed(case, [b for b, _ in case.runs.values()],
                                  f"the referee run could not be funded: {why}")
            return
        self._admit(ref)
        self.scheduler.enqueue(ref)
        self.dispatch()

    def _referee_verdict(self, case: Refereeing, ref: Ballot, made: rf.Commitment | str) -> None:
        (a, ca), (b, cb) = case.runs[0], case.runs[1]
        assert isinstance(ca, rf.Commitment) and isinstance(cb, rf.Commitment)
        j = case.segment
        verification = {"kind": "refereed", "agreed": False, "checkpoint": j,
                        "disputed_steps": [ca.steps[j - 1], ca.steps[j] - 1],
                        "referee": ref.provider_id, "providers": [a.provider_id, b.provider_id]}
        if isinstance(made, str):
            self._refereed_failed(case, [a, b, ref], f"the referee's run was invalid: {made}")
            return
        end = made.hashes[-1]
        winner = a if ca.hashes[j] == end else b if cb.hashes[j] == end else None
        if winner is None:
            self._refereed_failed(case, [a, b, ref], "the referee matched neither run")
            return
        loser = b if winner is a else a
        verification.update(winner=winner.provider_id, loser=loser.provider_id)
        log.warning("refereed task %s: the referee sides with %s against %s (steps %d-%d)",
                    winner.task.key, winner.provider_id, loser.provider_id,
                    ca.steps[j - 1], ca.steps[j] - 1)
        self._refereed_done(case, [winner, ref], [loser], winner, verification)

    def _judge_standing(self, paid: list[Ballot], unpaid: list[Ballot]) -> None:
        for ballot in paid:
            s = self.verifier.standing.setdefault(ballot.provider_account, Standing())
            s.valid += 1
            s.run += 1
        for ballot in unpaid:
            s = self.verifier.standing.setdefault(ballot.provider_account, Standing())
            s.invalid += 1
            s.run = 0

    def _close_case(self, case: Refereeing) -> None:
        self.refereeing.pop(case.vote.id, None)
        self.verifier.votes.pop(case.vote.id, None)
        for task in case.vote.replicas:
            self.verifier.of.pop(task.task_id, None)

    def _refereed_done(self, case: Refereeing, paid: list[Ballot], unpaid: list[Ballot],
                       accepted: Ballot, verification: dict) -> None:
        """The verdict: ``paid`` are settled at their capped usage, ``unpaid`` get nothing and
        lose reputation, the client gets ``accepted``'s result with ``verification``."""
        self._close_case(case)
        self._judge_standing(paid, unpaid)
        self.billing.refund([b.task.bill_id for b in unpaid if b.task.escrow_micro])
        funded = [b for b in paid if b.task.escrow_micro]
        charges = self.billing.settle([
            (b.task.bill_id, b.provider_account, b.task.usage, b.prices, True) for b in funded])
        first = case.vote.replicas[0]
        answer = replace(accepted.result, key=first.key, provider=accepted.provider_id,
                         usage=accepted.task.usage, verification=verification,
                         cost=sum(c.cost for c in charges if c is not None))
        if not any(c is not None for c in charges):
            self._send_results_to(first.session, [(answer, accepted.buffers)])
            return
        self._send_logged(first.session, answer, accepted.buffers,
                          vote_leaf(accepted, unpaid, list(zip(funded, charges, strict=True))),
                          [b.task.bill_id for b in funded])

    def _refereed_failed(self, case: Refereeing, unpaid: list[Ballot], why: str) -> None:
        """No run can be trusted: the task fails and nobody is paid (every escrow goes back);
        nobody is judged either, as no run was shown wrong."""
        self._close_case(case)
        self.billing.refund([b.task.bill_id for b in unpaid if b.task.escrow_micro])
        first = case.vote.replicas[0]
        log.warning("refereed task %s failed: %s", first.key, why)
        self._send_failure(first, p.ErrorCode.VERIFY,
                           f"refereed task {first.key}: {why}; no result is trusted",
                           "VerificationFailed")
