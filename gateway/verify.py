"""Result verification by redundancy, and provider reputation.

``redundancy=k`` runs a task as k replicas on k distinct providers. Their results are compared by
the hash of their bytes (the gateway never unpickles them); once a majority agrees, that result
goes to the client, the agreeing providers are paid and the out-voted ones are not, and lose
reputation. Adaptive replication (as BOINC does it): a replica from a provider with a long run of
valid results is accepted alone with probability ``1 - 1/run``, a spot check otherwise; one
invalid result resets the run. Reputation is ``(valid + 1) / (valid + invalid + 2)``.

Money follows the vote, never runs ahead of it: while a vote is open no tokens move (the hub
records usage and enforces budgets, but settles nothing); once it is decided only the agreeing
ballots are paid, and the replicas still running are cancelled unpaid, so what the client is told
a task cost is final the moment it gets the result.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from gateway.protocol import Result
from gateway.tasks import Task

#: Consecutive valid results after which a provider's lone result may be accepted.
TRUSTED_RUN = 10


@dataclass(slots=True)
class Standing:
    valid: int = 0
    invalid: int = 0
    run: int = 0  # consecutive valid

    @property
    def reputation(self) -> float:
        return (self.valid + 1) / (self.valid + self.invalid + 2)


@dataclass(slots=True, eq=False)
class Ballot:
    """One replica's outcome."""

    task: Task
    provider_id: str
    provider_account: str
    digest: str
    result: Result
    buffers: list[memoryview]
    #: The provider's prices when it ran the replica: it is paid at these once the vote is
    #: decided, even if it has left by then.
    prices: dict = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Vote:
    """The replicas of one task and the outcomes seen so far."""

    id: str
    replicas: list[Task]
    ballots: list[Ballot] = field(default_factory=list)
    winner: str | None = None

    @property
    def majority(self) -> int:
        return len(self.replicas) // 2 + 1


@dataclass(slots=True)
class Decision:
    """What to do after a ballot: forward ``accepted`` (if newly decided), pay, refuse pay."""

    accepted: Ballot | None = None
    paid: list[Ballot] = field(default_factory=list)
    unpaid: list[Ballot] = field(default_factory=list)
    cancel: list[Task] = field(default_factory=list)
    failed: bool = False


class Verifier:
    """Votes in progress, by the first replica's task id, and standings by provider account."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.votes: dict[str, Vote] = {}
        self.of: dict[str, Vote] = {}  # replica task id -> its vote
        self.standing: dict[str, Standing] = {}
        self.rng = rng or random.Random()

    def reputation(self, account: str) -> float:
        return self.standing.get(account, Standing()).reputation

    def record(self, account: str, valid: bool) -> None:
        """A result of ``account`` was checked another way (a proof): count it as a vote would."""
        standing = self.standing.setdefault(account, Standing())
        standing.valid += valid
        standing.invalid += not valid
        standing.run = standing.run + 1 if valid else 0

    def open(self, replicas: list[Task]) -> None:
        vote = Vote(replicas[0].task_id, list(replicas))
        self.votes[vote.id] = vote
        for task in replicas:
            self.of[task.task_id] = vote

    def close(self, task_id: str) -> tuple[list[Task], list[Ballot]] | None:
        """The client cancelled the task whose first replica is ``task_id``: its vote closes
        undecided. Returns its replicas and the ballots cast (their escrows go back), or None
        if it has no open vote."""
        vote = self.votes.pop(task_id, None)
        if vote is None:
            return None
        for task in vote.replicas:
            self.of.pop(task.task_id, None)
        return list(vote.replicas), list(vote.ballots)

    def voting(self, task: Task) -> bool:
        """Whether ``task`` is a replica whose ballot is still awaited."""
        return task.task_id in self.of

    def forget(self, task: Task) -> None:
        """The replica was cancelled by its client: its ballot is no longer awaited."""
        self.of.pop(task.task_id, None)

    def live_escrows(self) -> set[str]:
        """Escrow ids of replicas whose ballots are cast and wait for their vote's decision."""
        return {b.task.bill_id for vote in self.votes.values() for b in vote.ballots
                if b.task.escrow_micro}

    def siblings(self, task: Task) -> list[Task]:
        vote = self.of.get(task.task_id)
        return [] if vote is None else [t for t in vote.replicas if t is not task]

    def cast(self, ballot: Ballot) -> Decision:
        """Record a replica's outcome and say what follows from it."""
        vote = self.of.pop(ballot.task.task_id)
        vote.ballots.append(ballot)
        if vote.winner is not None:  # a straggler after the decision: paid only if it agrees
            decision = Decision()
            self._judge(vote, ballot, decision)
            self._close_if_done(vote)
            return decision
        if self._accept_alone(ballot):
            decision = Decision(accepted=ballot, paid=[ballot], cancel=self._pending(vote))
            vote.winner = ballot.digest
            for task in decision.cancel:
                self.of.pop(task.task_id, None)
            self._close_if_done(vote)
            return decision
        return self._tally(vote)

    def lost(self, task: Task) -> Decision:
        """A replica failed for good (provider lost past retries): it casts no ballot, and the
        vote is decided among the replicas left."""
        vote = self.of.pop(task.task_id, None)
        if vote is None:
            return Decision()
        vote.replicas = [t for t in vote.replicas if t is not task]
        if not vote.replicas:
            self._close_if_done(vote)
            return Decision(failed=True)
        if vote.winner is not None or not vote.ballots:
            return Decision()
        return self._tally(vote)

    def abandon(self, task: Task) -> tuple[list[Task], list[Ballot]]:
        """Close ``task``'s vote undecided (a replica spent its escrow): returns the replicas
        still open and the ballots cast. Nobody is judged: no result was compared."""
        vote = self.of.get(task.task_id)
        if vote is None:
            return [], []
        open_ = [t for t in vote.replicas if self.of.pop(t.task_id, None) is not None]
        self.votes.pop(vote.id, None)
        return open_, list(vote.ballots)

    def _tally(self, vote: Vote) -> Decision:
        counts = Counter(b.digest for b in vote.ballots)
        digest, n = counts.most_common(1)[0]
        if n >= vote.majority:
            vote.winner = digest
            decision = Decision(accepted=next(b for b in vote.ballots if b.digest == digest),
                                cancel=self._pending(vote))
            for task in decision.cancel:  # decided: the rest are not needed, nor paid
                self.of.pop(task.task_id, None)
            for b in vote.ballots:
                self._judge(vote, b, decision)
            self._close_if_done(vote)
            return decision
        if len(vote.ballots) == len(vote.replicas):  # everyone voted, no majority
            self._close_if_done(vote)
            return Decision(unpaid=list(vote.ballots), failed=True)
        return Decision()

    def _accept_alone(self, ballot: Ballot) -> bool:
        run = self.standing.get(ballot.provider_account, Standing()).run
        return run >= TRUSTED_RUN and self.rng.random() >= 1.0 / run

    def _pending(self, vote: Vote) -> list[Task]:
        voted = {b.task.task_id for b in vote.ballots}
        return [t for t in vote.replicas if t.task_id not in voted]

    def _judge(self, vote: Vote, ballot: Ballot, decision: Decision) -> None:
        standing = self.standing.setdefault(ballot.provider_account, Standing())
        if ballot.digest == vote.winner:
            standing.valid += 1
            standing.run += 1
            decision.paid.append(ballot)
        else:
            standing.invalid += 1
            standing.run = 0
            decision.unpaid.append(ballot)

    def _close_if_done(self, vote: Vote) -> None:
        if not any(t.task_id in self.of for t in vote.replicas):
            self.votes.pop(vote.id, None)
