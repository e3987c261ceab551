"""The spot-check judge (sans-I/O): who wins, who is paid, who lied, and when to run more."""

from __future__ import annotations

import pickle

import cloudpickle

from gateway.billing import result_hash
from gateway.protocol import Result, Runtime, TaskSpec
from gateway.spot_check import CHECK_PASSED, MAX_RUNS, Case, Verdict, check_payload, judge
from gateway.tasks import Task
from gateway.verify import Ballot

SPEC = TaskSpec(key="t", func="f", nb=0, runtime=Runtime("3.11", "3.1"), spot_check=0.5)
PASS, FAIL = result_hash([memoryview(CHECK_PASSED)]), "fail-digest"


def run(account: str, digest: str) -> Ballot:
    task = Task(SPEC, "client", "s", memoryview(b""), [])
    return Ballot(task, f"p-{account}", account, digest, Result(key="t", status="finished"), [])


def test_pass_is_the_pickle_of_true_a_worker_sends() -> None:
    assert cloudpickle.dumps(True, protocol=5) == CHECK_PASSED
    assert cloudpickle.dumps(False, protocol=5) != CHECK_PASSED


def test_the_check_payload_is_the_result_and_argument_bytes_untouched() -> None:
    head, *bufs = check_payload([memoryview(b"result")], [memoryview(b"a"), memoryview(b"b")])
    (result, args), kwargs = pickle.loads(head, buffers=bufs)
    assert [bytes(b) for b in result] == [b"result"] and [bytes(b) for b in args] == [b"a", b"b"]
    assert kwargs == {}


def test_rerun_mode_needs_two_agreeing_runs_and_the_odd_one_is_unpaid() -> None:
    case = Case(Task(SPEC, "client", "s", memoryview(b""), []), [run("liar", "bad")])
    assert judge(case) == "run"
    case.ballots.append(run("b", "good"))
    assert judge(case) == "run"  # one against one: a third decides
    case.ballots.append(run("c", "good"))
    verdict = judge(case)
    assert isinstance(verdict, Verdict) and verdict.winner.digest == "good"
    assert [b.provider_account for b in verdict.unpaid] == ["liar"]


def test_a_lying_checker_is_found_out_by_a_rerun() -> None:
    honest = run("a", "good")
    case = Case(honest.task, [honest], check_blob=memoryview(b"fn"))
    assert judge(case) == "check"
    case.verdicts.append((run("liar", FAIL), honest))
    assert judge(case) == "run"
    case.ballots.append(run("c", "good"))
    verdict = judge(case)
    assert verdict.winner is honest
    assert [b.provider_account for b in verdict.unpaid] == ["liar"]


def test_a_failed_check_then_a_rerun_that_passes_its_own_check_wins() -> None:
    """Three accounts suffice: the liar's claim, a check, a re-run checked by the checker."""
    liar = run("liar", "noise")
    case = Case(liar.task, [liar], check_blob=memoryview(b"fn"))
    case.verdicts.append((run("b", FAIL), liar))
    case.ballots.append(run("c", "good"))
    assert judge(case) == "check"
    case.verdicts.append((run("b", PASS), case.ballots[-1]))
    verdict = judge(case)
    assert verdict.winner.provider_account == "c"
    assert [b.provider_account for b in verdict.unpaid] == ["liar"]
    assert sorted(b.provider_account for b in verdict.paid) == ["b", "b", "c"]


def test_no_agreement_after_max_runs_fails_and_pays_nobody() -> None:
    case = Case(Task(SPEC, "client", "s", memoryview(b""), []),
                [run(str(i), f"d{i}") for i in range(MAX_RUNS)])
    verdict = judge(case)
    assert verdict.failed and not verdict.paid and len(verdict.unpaid) == MAX_RUNS
