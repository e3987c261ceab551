"""Graphs: dependents woken or failed, kept results fetched, released, recomputed.

Rules for graph tasks (Dask): a finished task wakes its dependents, a failed one fails them (in
slices), kept results go to clients and providers through the relay, and a result lost with its
provider is computed again from its lineage. Part of :class:`gateway.hub.Hub` (a mixin).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from gateway import protocol as p
from gateway.outcomes import (
    failure,
    hold_refusal,
)
from gateway.registry import ProviderConn
from gateway.sessions import ClientSession
from gateway.tasks import Task, TaskState

log = logging.getLogger(__name__)


#: Dependents of a failed graph task failed in one go; the rest wait for the next slice.
FAIL_SLICE = 2_000


class GraphRules:
    """Graphs: dependents woken or failed, kept results fetched, released, recomputed."""

    def _graph_outcome(self, task: Task, conn: ProviderConn, result: p.Result) -> None:
        """A graph task ended: wake its dependents, or fail them; free what is done with."""
        if task.task_id not in self.graph.nodes:
            return
        freeable = self.graph.done_with_deps(task.task_id)
        if result.status == "finished" and result.stored:
            for ready in self.graph.finished(task.task_id, conn.id, result.nbytes):
                self.scheduler.enqueue(ready, front=True)  # depth first, as Dask orders
            if self.graph.deliveries.get(task.task_id) or self.graph.client_fetches.get(
                    task.task_id):
                self.relay.request(task.task_id)
        else:
            self._fail_like(self.graph.failed(task.task_id), task, result)
        self.relay.release(freeable)

    def _fail_like(self, dependents: list[Task], failed: Task, result: p.Result) -> None:
        """Dependents of a failed task fail with the same error (as Dask raises it): one refund
        call and a few frames per ``FAIL_SLICE`` of them; past the first slice the rest is
        deferred to :meth:`work`, so a 100,000-task chain never stalls other peers."""
        if len(dependents) > FAIL_SLICE:
            rest = dependents[FAIL_SLICE:]
            self._defer(lambda: self._fail_like(rest, failed, result))
            dependents = dependents[:FAIL_SLICE]
        dependents = [d for d in dependents if d.state is TaskState.PENDING]
        if not dependents:
            return
        error = result.error or p.RemoteFailure(
            type="RuntimeError", module="builtins", message=f"{failed.key} {result.status}")
        for dependent in dependents:
            self.scheduler.discard(dependent)
        self.billing.refund([d.bill_id for d in dependents if d.escrow_micro])
        out: dict[str, list[tuple[p.Result, list]]] = defaultdict(list)
        for dependent in dependents:
            self._end(dependent, TaskState.ERROR)
            out[dependent.session].append((p.Result(key=dependent.key, status="error",
                                                    code=result.code, error=error), []))
        for session_id, items in out.items():
            session = self.sessions.get(session_id)
            if session is not None:
                self._send_results(session, items)

    def fetch(self, session: ClientSession, keys: Sequence[str]) -> None:
        """A client wants the bytes of kept results."""
        unknown = self.relay.fetch_for_client(session, keys)
        if unknown:
            self._send_results(session, [(failure(
                k, p.ErrorCode.NOT_FOUND, f"no kept result {k!r} in this session", "KeyError"), [])
                for k in unknown])

    def release(self, session: ClientSession, keys: Sequence[str]) -> None:
        """The client holds no future for these keys any more."""
        ids = [f"{session.id}/{k}" for k in keys]
        self.relay.release([i for i in ids if self.graph.release(i)])

    def data(self, conn: ProviderConn, msg: p.Data, buffers: Sequence[memoryview]) -> None:
        """Kept results' bytes (or "missing") from a provider: believed only as the answer to an
        open fetch the gateway sent that provider for that key; anything else is counted."""
        self.counters.dropped.update(self.relay.data(conn.id, msg, buffers))

    def _recompute(self, task_id: str) -> None:
        """A kept result is held nowhere any more but still needed: run its lineage again."""
        self._rerun(self.graph.rerun_closure([task_id]))
        self.dispatch()

    def _rerun(self, tasks: list[Task]) -> None:
        """Finished graph tasks whose results are gone run again (each billed anew)."""
        for task in tasks:
            task.move(TaskState.PENDING)
            task.provider = None
            task.reruns += 1
            why = None
            if task.escrow_micro:  # free (or prepaid) tasks hold no escrow, now as at first
                why = self.billing.hold([(task.bill_id, task.account, task.spec)])[0]
            if why is not None:
                refusal = hold_refusal(task.key, why)
                self._fail(task, p.ErrorCode(refusal.code),
                           f"recomputing lost {task.key}: {why}", refusal.error.type)
                continue
            self._admit(task)
            if not self.graph.nodes[task.task_id].waiting:
                self.scheduler.enqueue(task, front=True)
