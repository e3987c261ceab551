"""Spot checks: a random sample of results is checked on a provider of another account.

``spot_check=RATE`` on a plain task: when its result arrives, the gateway draws (its own random
source, never known to the provider) whether to check it. An unchecked result is paid and
delivered at once, and remembered. A checked one is held (neither paid nor delivered) while a
provider of another account checks it, in one of two ways:

- **re-run** (no ``check`` function): the whole task runs again and the result hashes are
  compared. Two agreeing runs of distinct accounts decide; a disagreement brings a third run
  (up to :data:`MAX_RUNS`), and the majority wins.
- **check function** (``check=FN``): a check task runs ``FN(result, *args, **kwargs)`` with the
  claimed result. The client pickled ``FN`` (wrapped) at submit; the gateway builds the check
  task's payload from the claimed result's bytes and the task's argument bytes without
  unpickling either (:func:`check_payload`), and reads the verdict by comparing the check's
  result bytes with the pickle of ``True``. A failed check is adjudicated by re-runs as above:
  if a re-run agrees with the claimed result, the checker lied.

Whoever the decision out-votes is paid nothing (escrow back), its reputation resets, and it
becomes a *suspect* in that client session: its later results there are all checked, and its
unchecked results already delivered in the session are checked too (late checks: the client
is told their outcome in ``fut.verification``; the money already paid for them stays paid).
What is not covered: two colluding accounts that agree on a wrong result, and results that are
not ``finished`` (errors are delivered and paid as usual).
"""

from __future__ import annotations

import pickle
import random
import secrets
from collections import Counter, deque
from dataclasses import dataclass, field

from gateway.protocol import TaskSpec
from gateway.tasks import Task
from gateway.verify import Ballot

#: The bytes a check function's wrapper returns when the check passed: ``pickle.dumps(True,
#: protocol=5)`` (what the worker sends for ``True``). Anything else (False, an error) fails.
CHECK_PASSED = b"\x80\x05\x88."
#: Full runs of one task (the claimed one included) before a check gives up undecided.
MAX_RUNS = 4
#: Check tasks are numbered from here (their task id is ``<task>#<n>``; replicas use < 16).
REPLICA_BASE = 100
#: Unchecked results remembered per (session, provider account), for late checks.
MAX_UNCHECKED = 10_000


def check_payload(result: list[memoryview], payload: list[memoryview]) -> list:
    """The check task's argument buffers: ``((result buffers, argument buffers), {})`` pickled
    with every buffer out of band. Pickling bytes is not unpickling anything: the gateway
    never reads them; the client's wrapper (:func:`notebook_ext.spot_checks.run_check`) does,
    on the checker, through the allow-list unpickler."""
    out: list = []
    args = ([pickle.PickleBuffer(b) for b in result], [pickle.PickleBuffer(b) for b in payload])
    head = pickle.dumps((args, {}), protocol=5, buffer_callback=out.append)
    return [memoryview(head), *(b.raw() for b in out)]


def spot_check_problem(spec: TaskSpec, funcs: dict[str, memoryview]) -> str | None:
    """Why a task's spot-check fields are refused, or None."""
    if spec.check is not None and spec.check not in funcs:
        return f"check function {spec.check[:16]} is not in the submission's functions"
    if spec.check is not None and spec.spot_check <= 0:
        return "check= needs spot_check= > 0"
    if spec.redundancy > 1 or spec.deps is not None or spec.items or spec.keep:
        return "spot_check is for plain tasks (not redundancy > 1, graph tasks or chunks)"
    return None


@dataclass(eq=False, slots=True)
class Case:
    """One result under check: the runs and check verdicts gathered so far."""

    task: Task  # the original task (ended; its escrow held unless ``delivered``)
    ballots: list[Ballot]  # full runs, the claimed one first
    check_blob: memoryview | None = None  # the wrapped check function, if the task has one
    delivered: bool = False  # a late check: the claimed result was paid and delivered already
    #: Check-function runs: (its outcome, the run it checked).
    verdicts: list[tuple[Ballot, Ballot]] = field(default_factory=list)
    running: Task | None = None
    target: Ballot | None = None  # the run the running check task checks
    made: int = 0

    @property
    def claimed(self) -> Ballot:
        return self.ballots[0]

    def accounts(self, runs_only: bool = False) -> set[str]:
        """Accounts that ran this task (and, unless ``runs_only``, that checked it)."""
        checkers = () if runs_only else (v for v, _ in self.verdicts)
        return {b.provider_account for b in (*self.ballots, *checkers)}

    def everyone(self) -> list[Ballot]:
        return [*self.ballots, *(v for v, _ in self.verdicts)]


@dataclass(slots=True)
class Verdict:
    """A decided case: the winning run, who is paid, who is not (and is caught)."""

    winner: Ballot | None
    paid: list[Ballot]
    unpaid: list[Ballot]
    failed: bool = False


def judge(case: Case) -> Verdict | str:
    """The verdict, or what to run next: ``"check"`` (the check function on the latest run) or
    ``"run"`` (one more full run). Two agreeing runs decide; with a check function, so does a
    run that passed its check while no two runs agree (a checker that failed a result the
    decision upholds, or passed one it rejects, lied)."""
    digest, n = Counter(b.digest for b in case.ballots).most_common(1)[0]
    if n < 2:
        if case.check_blob is None:
            return _more(case)
        last = case.ballots[-1]
        verdicts = [v for v, target in case.verdicts if target is last]
        if not verdicts:
            return "check"
        if verdicts[-1].digest != _PASSED_DIGEST:
            return _more(case)
        digest = last.digest
    paid = [b for b in case.ballots if b.digest == digest]
    unpaid = [b for b in case.ballots if b.digest != digest]
    for v, target in case.verdicts:
        honest = (v.digest == _PASSED_DIGEST) == (target.digest == digest)
        (paid if honest else unpaid).append(v)
    return Verdict(paid[0], paid, unpaid)


def _more(case: Case) -> Verdict | str:
    if len(case.ballots) >= MAX_RUNS:
        return Verdict(None, [], [*case.ballots, *(v for v, _ in case.verdicts)], failed=True)
    return "run"


def _digest_of_pass() -> str:
    from gateway.billing import result_hash  # the digest outcome_digest gives CHECK_PASSED

    return result_hash([memoryview(CHECK_PASSED)])


_PASSED_DIGEST = _digest_of_pass()


class SpotChecks:
    """Cases in progress (by their running check task's id), suspects, unchecked results."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or secrets.SystemRandom()
        self.cases: dict[str, Case] = {}
        self.blobs: dict[str, memoryview] = {}  # task id -> its wrapped check function
        self.suspects: set[tuple[str, str]] = set()  # (session, provider account)
        self.unchecked: dict[tuple[str, str], deque[Case]] = {}
        self.checks_run = 0
        self.caught = 0

    def admit(self, task: Task, blob: memoryview | None) -> None:
        if blob is not None:
            self.blobs[task.task_id] = blob

    def draw(self, task: Task, account: str) -> bool:
        """Whether this result is checked: always for a suspect, else with the task's rate."""
        if (task.session, account) in self.suspects:
            return True
        return self.rng.random() < task.spec.spot_check

    def owns(self, task: Task) -> bool:
        return task.task_id in self.cases

    def remember(self, task: Task, ballot: Ballot, blob: memoryview | None) -> None:
        """An unchecked result, delivered: kept (with the task's payload: the memory a late
        check costs) for a late check if its provider is caught."""
        if blob is None:  # a re-run compares hashes: the result's bytes are not needed
            ballot.buffers = []
        queue = self.unchecked.setdefault((task.session, ballot.provider_account),
                                          deque(maxlen=MAX_UNCHECKED))
        queue.append(Case(task, [ballot], blob, delivered=True))

    def suspect(self, session: str, account: str) -> list[Case]:
        """``account`` was caught in ``session``: its unchecked results there, to check now."""
        self.suspects.add((session, account))
        return list(self.unchecked.pop((session, account), ()))

    def live_escrows(self) -> set[str]:
        """Escrows held by results under check (the running check tasks are in the table)."""
        out: set[str] = set()
        for case in self.cases.values():
            out |= {b.task.bill_id for b in case.everyone() if b.task.escrow_micro
                    and not (case.delivered and b is case.claimed)}
        return out
