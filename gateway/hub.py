"""The gateway core: what happens when a client submits, a provider reports, a peer leaves.

Sans-I/O, in h11's shape: the shell (:mod:`gateway.server`) hands it decoded events (a message,
a peer joining or leaving, the one-second tick, the accounting worker's answer) and it answers
with effects: frames put on each peer's writer queue (``send`` never blocks and does no I/O),
ledger work appended to the journal (:mod:`gateway.journal`; the shell hands it to the
accounting worker), and deadlines on its own heap (the tick drives them). It never touches SQLite,
a signature or a socket. Payload buffers pass through as opaque memoryviews: the core never
unpickles anything.

The state has owners, each in its own module: the task table (:mod:`gateway.task_table`), the
books (:mod:`gateway.accounts` through :mod:`gateway.billing`), funding
(:mod:`gateway.funding`), admission (:mod:`gateway.admission`), placement
(:mod:`gateway.scheduler`, :mod:`gateway.registry`), votes (:mod:`gateway.verify`), graphs
(:mod:`gateway.graph`, :mod:`gateway.relay`), delivery (:mod:`gateway.delivery`), deadlines and
standing. The rules that connect them live here and, split by concern, in the ``core_*`` modules.
Every handler runs behind :meth:`Hub.contain`: one that raises fails the tasks it concerned and
returns their escrow.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from gateway import chunks
from gateway import protocol as p
from gateway.admission import Admission, Batch
from gateway.billing import (
    Billing,
)
from gateway.core_blobs import BlobRules, may_leave_blobs
from gateway.core_checks import CheckRules
from gateway.core_graphs import GraphRules
from gateway.core_ledger import LedgerRules
from gateway.core_proofs import ProofRules, Proofs
from gateway.core_referee import RefereeRules
from gateway.core_reports import ReportRules
from gateway.core_upkeep import UpkeepRules
from gateway.core_votes import VoteRules
from gateway.deadlines import TIMEOUT_GRACE, Deadlines, Kind
from gateway.delivery import Delivery
from gateway.funding import Funding
from gateway.graph import Graph
from gateway.limits import Limits
from gateway.metrics import Counters
from gateway.names import Names
from gateway.outcomes import (
    Failing,
    failure,
    hold_refusal,
)
from gateway.registry import ProviderConn, Registry
from gateway.relay import Relay
from gateway.scheduler import Scheduler
from gateway.sessions import ClientSession
from gateway.spot_check import SpotChecks
from gateway.standing import Standing
from gateway.task_table import TaskTable
from gateway.tasks import ANSWERED, Task, TaskState
from gateway.transfers import Transfers
from gateway.verify import Verifier

log = logging.getLogger(__name__)

#: How long a task waits when no provider at all is online before it fails (the default of
#: ``Limits.no_provider_wait``).
NO_PROVIDER_WAIT = Limits().no_provider_wait
#: How long a task that no online provider can take (after one left) waits for one to come back
#: before it fails: a pinned task survives its provider's reconnect (``Limits.rejoin_grace``).
REJOIN_GRACE = Limits().rejoin_grace

class Hub(LedgerRules, ReportRules, VoteRules, CheckRules, GraphRules, UpkeepRules,
          BlobRules, RefereeRules, ProofRules):
    """Tasks, sessions and providers, and the rules that connect them."""

    def __init__(self, billing: Billing, limits: Limits | None = None,
                 names: Names | None = None, spot_rng: random.Random | None = None) -> None:
        self.billing = billing
        self.limits = limits or Limits()
        self.registry = Registry()
        self.graph = Graph()
        self.standing = Standing()
        self.names = names or Names()
        self.scheduler = Scheduler(self.registry, self.graph, self.standing)
        self.deadlines = Deadlines()
        self._recheck_at: float | None = None  # when to re-check pending tasks' placeability
        self._recheck: list[Task] = []  # the snapshot being re-checked, a slice a tick
        self._left_at = float("-inf")  # when a provider last left
        #: Bulk work deferred in slices (the failures of a long chain); the shell calls
        #: :meth:`work` until it is empty, serving connections between slices, after ``wake``.
        self.later: deque[Callable[[], None]] = deque()
        self.wake: Callable[[], None] = lambda: None
        self._empty_since = time.monotonic()  # when the last provider left (or the start)
        self.delivery = Delivery(
            lambda session: self.cancel(session, self.tasks.keys_of_session(session.id)))
        self.sessions = self.delivery.sessions
        self.transfers = Transfers(billing, self.delivery)
        self.relay = Relay(self.registry, self.graph, self.sessions, self._recompute)
        self.verifier = Verifier()
        self.spot = SpotChecks(spot_rng)
        self.refereeing: dict = {}  # refereed tasks in dispute (gateway.core_referee)
        self.proofs = Proofs()
        self.tasks = TaskTable()
        self.counters = Counters()
        self.funding = Funding(billing, self.registry)
        self.admission = Admission(self.tasks, self.graph, self.registry, self.limits)
        self.scheduler.admits = self.funding.may_place
        self._init_blobs()

    # ------------------------------------------------------------------ clients

    def may_attach(self, account: str, session_id: str) -> bool:
        """A session id is only ever resumed by the account that opened it."""
        session = self.sessions.get(session_id)
        return session is None or session.account == account

    def attach_client(self, account: str, session_id: str, send: p.Send,
                      prepaid: set[str] | None = None) -> ClientSession:
        """A client (re)connects; a known session gets what finished while it was away. The
        shell loaded the account's books first and, for a session new here, read from the
        ledger which of its tasks were settled for good before a restart lost their results
        (``prepaid``: resubmitted, they run again, charged nothing)."""
        session = self.sessions.get(session_id)
        if session is None or session.account != account:
            if session is not None:  # a forged or colliding session id: never hand it over
                raise PermissionError("session belongs to another account")
            session = self.sessions[session_id] = ClientSession(id=session_id, account=account)
            self.funding.settled_before(session_id, prepaid or set())
        flushed = session.attach(send)
        if flushed:
            log.info("session %s resumed: %d waiting frames delivered", session_id, flushed)
        self._pull_parked_of(session_id)
        return session

    def detach_client(self, session: ClientSession, unsent: Sequence[p.Frame] = ()) -> None:
        """The client's connection closed; ``unsent`` frames wait for its reconnect (but not
        blob traffic: those transfers end here, and run again on a reconnect)."""
        session.detach([f for f in unsent if not isinstance(f, p.Transient)])
        self.blobs.peer_gone(("c", session.id))
        self._blob_endings()

    def submit(self, session: ClientSession, msg: p.Submit, buffers: Sequence[memoryview]) -> None:
        """Accept a batch of tasks; refuse single tasks with an error result, never the batch."""
        funcs = dict(zip(msg.funcs, buffers[: len(msg.funcs)], strict=True))
        payloads = p.split_buffers([t.nb for t in msg.tasks], buffers[len(msg.funcs):])
        refused: list[p.Result] = []
        accepted: list[Task] = []
        in_batch: set[str] = set()
        batch = Batch()
        for spec, payload in zip(msg.tasks, payloads, strict=True):
            task_id = f"{session.id}/{spec.key}"
            why = self.refereed_refusal(spec, payload) if spec.refereed else None
            why = why or self.admission.refusal(spec, session.account, task_id, funcs, batch)
            why = why or self._proof_refusal(spec)
            if why is None and spec.refs:
                bad = self._refs_refusal(spec, session.account)
                why = None if bad is None else failure(spec.key, p.ErrorCode.SCHEMA, bad,
                                                       "ValueError")
            if why is None and task_id in in_batch:
                why = failure(spec.key, p.ErrorCode.SCHEMA,
                              f"task key {spec.key!r} already in use (twice in one batch)")
            in_batch.add(task_id)
            if why is not None:
                refused.append(why)
            else:
                batch.add(spec, payload)
                accepted += self._replicas(Task(spec, session.account, session.id,
                                                funcs[spec.func], payload))
        holds = self.funding.fund(session.id, accepted)
        failed = {t.task_id: why for t, why in zip(accepted, holds, strict=True) if why}
        unfunded: list[str] = []
        for task, why in zip(accepted, holds, strict=True):
            group_why = why or next((failed[s.task_id] for s in task.siblings
                                     if s.task_id in failed), None)
            if group_why is not None:  # a replica that cannot be funded refuses them all
                if why is None:
                    unfunded.append(task.bill_id)
                if task.replica == 0:
                    refused.append(hold_refusal(task.key, group_why))
                continue
            if task.siblings and task.replica == 0:
                self.verifier.open([task, *task.siblings])
            if task.spec.deps is not None:
                unknown = self.graph.add(task)
                if unknown is not None:
                    self.billing.refund([task.bill_id])
                    refused.append(failure(task.key, p.ErrorCode.NOT_FOUND, unknown, "KeyError"))
                    continue
            self._admit(task)
            self.spot.admit(task, funcs.get(task.spec.check or ""))
            if task.spec.deps is None or self.graph.ready(task.task_id):
                self.scheduler.enqueue(task)
            self.counters.submitted += 1
        if refused:
            self.counters.refused.update(r.code for r in refused)
            self._send_results(session, [(r, []) for r in refused])
        if unfunded:
            self.billing.refund(unfunded)
        if not len(self.registry) and accepted:
            self._recheck_after(self.limits.no_provider_wait)  # fail them if none comes
        self.dispatch()

    # ------------------------------------------------------------------ escrow

    def live_escrows(self) -> set[str]:
        """Escrow ids of tasks still open here (on the gateway, or replicas whose ballots wait
        for their vote): ``Ledger.check(live=...)`` reports any other held escrow as stale."""
        live = {t.bill_id for t in self.tasks.values() if t.escrow_micro}
        return (live | self.verifier.live_escrows() | self.spot.live_escrows()
                | self.proofs.live_escrows())

    def _replicas(self, task: Task) -> list[Task]:
        """``redundancy=k``: k replicas of the task, each knowing its siblings."""
        k = task.spec.redundancy
        if k <= 1:
            return [task]
        replicas = [task] + [Task(task.spec, task.account, task.session, task.func_blob,
                                  task.payload, replica=i) for i in range(1, k)]
        for r in replicas:
            r.siblings = [s for s in replicas if s is not r]
        return replicas

    def _admit(self, task: Task) -> None:
        self.tasks.admit(task)

    def cancel(self, session: ClientSession, keys: Sequence[str]) -> None:
        """Cancel pending tasks here; ask the provider to kill running ones."""
        done: list[tuple[p.Result, list]] = []
        by_provider: dict[str, list[Task]] = defaultdict(list)
        refunds: list[str] = []
        for key in keys:
            task_id = f"{session.id}/{key}"
            self.refereeing.pop(task_id, None)
            vote = self.verifier.close(task_id)  # a redundant task's open vote closes: the
            replicas, ballots = vote or ([], [])  # ballots cast are neither judged nor paid
            refunds += [b.task.bill_id for b in ballots if b.task.escrow_micro]
            first = self.tasks.get(task_id) or (replicas[0] if replicas else None)
            if first is None:
                if self._spot_cancel(task_id, refunds):  # a result held for its check
                    done.append((p.Result(key=key, status="cancelled", code="cancelled"), []))
                continue
            cancelled = False
            for task in (first, *first.siblings):
                if task.state in ANSWERED:
                    continue
                cancelled = True
                self.verifier.forget(task)
                if task.state is TaskState.PENDING:
                    self.scheduler.discard(task)
                    if task.escrow_micro:  # a free task holds none: no ledger work at all
                        refunds.append(task.bill_id)
                    self._end(task, TaskState.CANCELLED)
                else:
                    self._answered(task, TaskState.CANCELLING, TaskState.CANCELLED)
                    by_provider[task.provider].append(task)
            if cancelled:
                done.append((p.Result(key=key, status="cancelled", code="cancelled"), []))
        if refunds:
            self.billing.refund(refunds)  # one transaction, however many
        for provider_id, tasks in by_provider.items():
            self.send_cancel(provider_id, tasks)
        if done:
            self._send_results(session, done)

    def send_cancel(self, provider_id: str, tasks: Sequence[Task]) -> None:
        """Ask a provider to stop tasks; it has ``limits.cancel_grace`` to report each key, after
        which the gateway frees the slot anyway."""
        conn = self.registry.get(provider_id)
        if conn is None or not tasks:
            return
        due = time.monotonic() + self.limits.cancel_grace
        for task in tasks:
            self.deadlines.at(due, task.task_id, task.assignment, Kind.CANCEL)
        conn.send(p.encode(p.Cancel(keys=[t.task_id for t in tasks])))

    def query(self, account: str, session_id: str, q: p.Query) -> p.Reply | None:
        """Answer a peer's question; unknown questions get an error reply, not a close. None:
        the answer follows later (a transfer's, once its leaf is committed)."""
        if q.what == "transfer":
            return self.transfers.request(account, session_id, q)
        if q.what == "balance":
            return p.Reply(id=q.id, data=self.billing.balance(account))
        if q.what == "earnings":
            return p.Reply(id=q.id, data=self.billing.earnings(account))
        if q.what == "providers":
            return p.Reply(id=q.id, data=[
                dict(c.info(), reputation=self.verifier.reputation(c.account))
                for c in self.registry])
        if q.what == "resume":
            keys = q.args.get("keys", [])
            if not isinstance(keys, list):
                return p.Reply(id=q.id, error="resume: keys must be a list of task keys",
                               code=p.ErrorCode.SCHEMA.value)
            unknown = [k for k in keys if isinstance(k, str)
                       and f"{session_id}/{k}" not in self.tasks]
            return p.Reply(id=q.id, data={"unknown": unknown})
        return p.Reply(id=q.id, error=f"unknown query {q.what!r}", code=p.ErrorCode.NOT_FOUND.value)

    # ------------------------------------------------------------------ providers

    def join_provider(self, conn: ProviderConn) -> None:
        """A provider connected. Its name is bound to its account if nobody has it yet; under
        another account's name it is served, but pins by that name never reach it."""
        conn.owns_name = self.names.bind(conn.ad.name, conn.account)
        if not conn.owns_name:
            log.warning("provider %s uses the name %r of another account; pins by that name "
                        "will not reach it", conn.id, conn.ad.name)
            conn.send(p.encode(p.Error(
                code=p.ErrorCode.AUTH.value,
                message=f"the name {conn.ad.name!r} belongs to another account on this gateway: "
                        f"tasks pinned by that name will not come to you; pick another --name")))
        self.registry.add(conn)
        log.info("provider %s joined: %d cpus, %s, sandbox %s", conn.id, conn.ad.cpus,
                 conn.ad.runtime, conn.ad.sandbox)
        self.dispatch()

    def leave_provider(self, conn_id: str) -> None:
        """A provider vanished: its tasks go back to the queue, or fail after ``retries``."""
        conn = self.registry.remove(conn_id)
        if conn is None:
            return
        now = time.monotonic()
        self._left_at = now
        if not len(self.registry):
            self._empty_since = now
        log.warning("provider %s left with %d tasks", conn_id, len(conn.running))
        refunds: list[str] = []
        fails: list[Failing] = []
        lost = 0
        for task_id in list(conn.running):
            task = self.tasks.get(task_id)
            if task is None:
                continue
            if task.state in ANSWERED:
                if task.state is TaskState.CANCELLING and task.escrow_micro:
                    refunds.append(task.bill_id)  # paid up to its last reported usage
                self._end(task)
                continue
            lost += 1
            self._retry_or_fail(task, conn, f"provider {conn_id} was lost", fails)
        conn.running.clear()
        self.blobs.peer_gone(("p", conn_id))
        self._blob_endings()
        if lost:
            self.standing.lost(conn.account, f"left holding {lost} tasks", now)
        if refunds:
            self.billing.refund(refunds)
        self._fail_many(fails)
        self._rerun(self.graph.provider_lost(conn_id))
        self._recheck_after(self.limits.rejoin_grace if len(self.registry)
                            else self.limits.no_provider_wait)
        self.dispatch()

    def _retry_or_fail(self, task: Task, conn: ProviderConn, what: str,
                       fails: list[Failing]) -> None:
        """Its provider lost a task (left, or let the lease lapse): it runs elsewhere, or fails
        with ``ProviderLost`` once ``retries`` are used up. Tries count per account."""
        task.attempts += 1
        task.tried.add(conn.account)
        if task.attempts > task.spec.retries:
            msg = (f"{what} while running task {task.key}, {task.attempts} times in all "
                   f"(retries={task.spec.retries})")
            fails.append((task, p.ErrorCode.LOST, msg, "ProviderLost"))  # a replica: its vote
            return
        task.move(TaskState.PENDING)
        task.provider = None
        task.assigned_at = None
        self.scheduler.enqueue(task, front=True)
        self._send_events(task, p.Event(key=task.key, kind="retrying", provider=conn.id))

    def packages(self, conn: ProviderConn, msg: p.Packages) -> None:
        """A provider's packages changed: its own advertisement (the connection the message came
        on, never another's), packages and installs only. Waiting tasks may fit now."""
        self.registry.readvertise(
            conn, replace(conn.ad, packages=dict(msg.packages), installs=msg.installs))
        self.dispatch()

    # ------------------------------------------------------------------ scheduling

    def dispatch(self) -> None:
        """Place what can be placed and send each provider one Assign frame."""
        placed = self.scheduler.place()
        if not placed:
            return
        by_provider: dict[str, tuple[ProviderConn, list[Task]]] = {}
        now = time.monotonic()
        for conn, task in placed:
            task.move(TaskState.RUNNING)
            task.provider = conn.id
            self._set_deadlines(task, now)
            by_provider.setdefault(conn.id, (conn, []))[1].append(task)
        for conn, tasks in by_provider.values():
            funcs: dict[str, memoryview] = {}
            for task in tasks:
                if task.spec.func not in funcs and conn.needs_func(task.spec.func):
                    funcs[task.spec.func] = task.func_blob
            specs = [self._assignment(t, conn) for t in tasks]
            buffers = [*funcs.values(), *(b for t in tasks for b in t.payload)]
            conn.send(p.encode_parts(p.Assign(tasks=specs, funcs=list(funcs)), buffers))

    def _set_deadlines(self, task: Task, now: float) -> None:
        """A new assignment: its lease starts, and its timeout clock (if it has one)."""
        task.assignment += 1
        task.assigned_at = now
        task.started = None
        task.lease_until = now + self.limits.lease_seconds
        self.deadlines.at(task.lease_until, task.task_id, task.assignment, Kind.LEASE)
        if task.spec.timeout is not None:
            self.deadlines.at(now + task.spec.timeout + TIMEOUT_GRACE, task.task_id,
                              task.assignment, Kind.TIMEOUT)

    def renew(self, conn: ProviderConn, keys: Iterable[str]) -> None:
        """A heartbeat from ``conn`` mentioned these tasks (queued or running): their leases
        run on. Keys it does not hold are ignored."""
        until = time.monotonic() + self.limits.lease_seconds
        for key in keys:
            task = self.tasks.get(key)
            if task is not None and task.provider == conn.id and key in conn.running:
                task.lease_until = until

    def _assignment(self, task: Task, conn: ProviderConn) -> p.Assignment:
        deps = None
        if task.spec.deps is not None:
            deps = self.graph.nodes[task.task_id].deps
            for key in self.graph.missing_on(task, conn.id):
                self.relay.deliver(key, conn.id)
        if task.spec.refs:
            self._ship_refs(task, conn)
        return p.Assignment(key=task.task_id, func=task.spec.func, nb=task.spec.nb,
                            account=task.account, resources=task.spec.resources,
                            timeout=task.spec.timeout, deps=deps, keep=task.spec.keep,
                            send=task.spec.send, packages=task.spec.packages,
                            refs=task.spec.refs, blobs=may_leave_blobs(task),
                            **chunks.assignment_fields(task.spec))

    # ------------------------------------------------------------------ verification

    # ------------------------------------------------------------------ graphs

    # ------------------------------------------------------------------ helpers

    def _fail(self, task: Task, code: p.ErrorCode, message: str, type_: str) -> None:
        charge = self.billing.close([task.bill_id])[0] if task.escrow_micro else None
        self._end(task, TaskState.ERROR)
        session = self.sessions.get(task.session)
        if session is not None:  # the cost: what a lost provider was paid before it vanished
            self._send_results(session, [(replace(failure(task.key, code, message, type_),
                                                  cost=charge.cost if charge else 0.0), [])])

    def _defer(self, job: Callable[[], None]) -> None:
        self.later.append(job)
        self.wake()

    def work(self) -> None:
        """Run one deferred slice of bulk work."""
        if self.later:
            self.later.popleft()()

    def _fail_many(self, items: list[Failing]) -> None:
        """Fail tasks together: one refund call, a few frames per session. A graph task's
        dependents fail with it. A replica whose vote is open is lost to its vote instead,
        which decides among the replicas left (and answers the key once)."""
        for task, _, message, _ in [i for i in items if self.verifier.voting(i[0])]:
            self._replica_lost(task, message)
        items = [i for i in items if not self._spot_lost(i[0])]
        items = [i for i in items if i[0].state not in ANSWERED]
        if not items:
            return
        funded = [task.bill_id for task, *_ in items if task.escrow_micro]  # free: no ledger
        charges = dict(zip(funded, self.billing.close(funded), strict=True))
        out: dict[str, list[tuple[p.Result, list]]] = defaultdict(list)
        for task, code, message, type_ in items:
            charge = charges.get(task.bill_id)
            self._end(task, TaskState.ERROR)
            # the cost: what a lost provider was paid (heartbeats) before it vanished
            result = replace(failure(task.key, code, message, type_),
                             cost=charge.cost if charge else 0.0)
            out[task.session].append((result, []))
            if task.task_id in self.graph.nodes:
                self._fail_like(self.graph.failed(task.task_id), task, result)
        for session_id, results in out.items():
            session = self.sessions.get(session_id)
            if session is not None:
                self._send_results(session, results)

    def _end(self, task: Task, state: TaskState | None = None) -> None:
        """The task ends in ``state`` (counted), or, if the client was answered already
        (cancelling, stopping), in the ending it was told (counted then)."""
        if task.state in (TaskState.CANCELLING, TaskState.STOPPING):
            task.move(task.ending or TaskState.ERROR)
        else:
            assert state is not None
            task.move(state)
            self.counters.tasks[state.value] += 1
        if task.spec.refs:
            self._drop_task_blobs(task)
        self._forget(task)

    def _answered(self, task: Task, waiting: TaskState, ending: TaskState) -> None:
        """The client is answered (``ending``, counted now) while the provider still holds it."""
        task.wait_for_provider(waiting, ending)
        self.counters.tasks[ending.value] += 1

    def _forget(self, task: Task) -> None:
        self.tasks.forget(task)
        self.spot.blobs.pop(task.task_id, None)

    def _send_results(self, session: ClientSession, items: list[tuple[p.Result, list]]) -> None:
        self.delivery.send(session, items)

    def _send_results_to(self, session_id: str, items: list[tuple[p.Result, list]]) -> None:
        self.delivery.send_to(session_id, items)

    def _send_events(self, task: Task, event: p.Event) -> None:
        self.delivery.event(task.session, event)

    def gauges(self) -> dict[str, float]:
        running = sum(len(c.running) for c in self.registry)
        return {
            "providers_online": len(self.registry),
            "clients_connected": sum(s.connected for s in self.sessions.values()),
            "tasks_pending": len(self.scheduler),
            "deadlines_scheduled": len(self.deadlines),
            "tasks_running": running,
            "graph_results_kept": len(self.graph.nodes),
            "graph_bytes_produced": self.graph.bytes_produced,
            "graph_bytes_moved": self.graph.bytes_moved,
            "spot_checks_run": self.spot.checks_run,
            "spot_checks_failed": self.spot.caught,
        }


