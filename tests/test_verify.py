"""Verification by redundancy: majority vote, pay and reputation rules, adaptive acceptance."""

from __future__ import annotations

import random

from gateway.protocol import Result, Runtime, TaskSpec
from gateway.tasks import Task
from gateway.verify import TRUSTED_RUN, Ballot, Standing, Verifier


def replicas(k: int) -> list[Task]:
    spec = TaskSpec(key="t", func="f", nb=0, runtime=Runtime("3.11", "3.1"), redundancy=k)
    tasks = [Task(spec, "client", "s", memoryview(b""), [], replica=i) for i in range(k)]
    for t in tasks:
        t.siblings = [s for s in tasks if s is not t]
    return tasks


def ballot(task: Task, provider: str, digest: str) -> Ballot:
    return Ballot(task, provider, f"acct-{provider}", digest, Result(key="t", status="finished"),
                  [])


def test_majority_of_three_decides_and_the_outvoted_is_not_paid() -> None:
    v, (a, b, c) = Verifier(random.Random(0)), replicas(3)
    v.open([a, b, c])
    assert v.cast(ballot(a, "p1", "good")).accepted is None
    d = v.cast(ballot(b, "p2", "bad"))
    assert d.accepted is None and not d.failed
    d = v.cast(ballot(c, "p3", "good"))
    assert d.accepted is not None and d.accepted.digest == "good"
    assert {x.provider_id for x in d.paid} == {"p1", "p3"}
    assert [x.provider_id for x in d.unpaid] == ["p2"]
    assert v.reputation("acct-p2") < v.reputation("acct-p1")
    assert not v.votes and not v.of


def test_a_decided_vote_cancels_the_replicas_still_running_unpaid() -> None:
    """What the client is told a task cost is final when it gets the result: no straggler is
    paid after the decision (it is cancelled instead)."""
    v, (a, b, c) = Verifier(random.Random(0)), replicas(3)
    v.open([a, b, c])
    v.cast(ballot(a, "p1", "x"))
    d = v.cast(ballot(b, "p2", "x"))
    assert d.accepted is not None and d.cancel == [c]
    assert {x.provider_id for x in d.paid} == {"p1", "p2"} and not d.unpaid
    assert not v.votes and not v.of


def test_an_abandoned_vote_judges_nobody() -> None:
    v, (a, b, c) = Verifier(random.Random(0)), replicas(3)
    v.open([a, b, c])
    cast = ballot(a, "p1", "x")
    v.cast(cast)
    still, ballots = v.abandon(b)
    assert still == [b, c] and ballots == [cast]
    assert not v.votes and not v.of and "acct-p1" not in v.standing


def test_no_majority_fails_and_pays_nobody() -> None:
    v, (a, b) = Verifier(random.Random(0)), replicas(2)
    v.open([a, b])
    v.cast(ballot(a, "p1", "x"))
    d = v.cast(ballot(b, "p2", "y"))
    assert d.failed and not d.paid and len(d.unpaid) == 2


def test_a_provider_with_a_long_valid_run_may_be_accepted_alone() -> None:
    v = Verifier(random.Random(1))
    v.standing["acct-p1"] = Standing(valid=100, run=TRUSTED_RUN * 10)
    alone = 0
    for _ in range(50):
        a, b = replicas(2)
        v.open([a, b])
        d = v.cast(ballot(a, "p1", "x"))
        if d.accepted is not None:
            alone += 1
            assert d.cancel == [b]
        else:
            v.cast(ballot(b, "p2", "x"))
    assert 40 <= alone < 50  # accepted alone with probability 1 - 1/run; spot-checked otherwise


def test_one_invalid_result_resets_the_run() -> None:
    v, (a, b, c) = Verifier(random.Random(0)), replicas(3)
    v.standing["acct-p3"] = Standing(valid=5, run=5)
    v.open([a, b, c])
    v.cast(ballot(c, "p3", "y"))
    v.cast(ballot(a, "p1", "x"))
    assert [x.provider_id for x in v.cast(ballot(b, "p2", "x")).unpaid] == ["p3"]
    assert v.standing["acct-p3"].run == 0


def test_a_lost_replica_leaves_the_vote_to_the_others() -> None:
    v, (a, b, c) = Verifier(random.Random(0)), replicas(3)
    v.open([a, b, c])
    assert not v.lost(c).failed
    v.cast(ballot(a, "p1", "x"))
    assert v.cast(ballot(b, "p2", "x")).accepted is not None
