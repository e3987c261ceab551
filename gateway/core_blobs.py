"""Blob rules: big arguments, big results and scattered data, moved cut-through.

Part of :class:`gateway.hub.Hub` (a mixin; the tables live in :class:`gateway.blobs.Blobs`).

- A task's blobs go to the provider it is assigned to before it runs there (the provider waits
  for them): from another provider holding a scattered blob, else from the client, which keeps
  what it sent until the task ends (rescatter: nothing here is recomputed from lineage).
- A result with blobs is *parked*: its bytes stream provider -> client first, hashed on the way;
  only when all arrived intact is the result handled like any other (settled, paid, delivered).
  A provider is never paid for bytes it did not deliver, nor for bytes that do not match the
  hash it named: that result is refused and the task runs elsewhere.
- ``scatter`` stores blobs on one provider (or every eligible one), ``drop`` releases them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gateway import protocol as p
from gateway.blob_messages import is_content_id
from gateway.blobs import BlobInfo, Blobs, Ended, Peer
from gateway.outcomes import Failing
from gateway.registry import ProviderConn
from gateway.sessions import ClientSession
from gateway.tasks import Task, TaskState

log = logging.getLogger(__name__)


@dataclass
class Parked:
    """A result whose blobs are on their way to the client."""

    provider: str
    result: p.Result
    buffers: list
    waiting: set[str]


def may_leave_blobs(task: Task) -> bool:
    """Whether a task's result may stay on its provider as blobs: a plain task, one replica,
    not kept for a graph (the client pulls it once, then the provider frees it)."""
    spec = task.spec
    return (spec.redundancy == 1 and not spec.items and spec.deps is None and not spec.keep
            and not spec.spot_check)


class BlobRules:
    """Blobs of tasks, results and scatters; see the module docstring."""

    def _init_blobs(self) -> None:
        self.blobs = Blobs(self._send_peer)
        self.parked: dict[str, Parked] = {}
        #: Results handled once their blobs arrived (re-entering :meth:`results`).
        self.unparked: set[str] = set()
        #: Peers a chunk was just forwarded to: the shell waits for their writers to drain.
        self.pressure: list[Peer] = []
        self.scheduler.missing_bytes = lambda task, pid: self.blobs.missing_bytes(
            task.account, task.spec.refs, pid)

    def _send_peer(self, peer: Peer, frame: p.Frame) -> bool:
        kind, pid = peer
        if kind == "p":
            conn = self.registry.get(pid)
            if conn is None:
                return False
            conn.send(frame)
            return True
        session = self.sessions.get(pid)
        return session is not None and session.connected and session.send(frame) is not False

    # ------------------------------------------------------------------ tasks' blobs

    def _refs_refusal(self, spec: p.TaskSpec, account: str) -> str | None:
        """Why a task's blob references cannot be taken (an id reused with another size)."""
        for _, bid, size in spec.refs:
            info = self.blobs.note(account, bid, size)
            if isinstance(info, str):
                return info
        return None

    def _ship_refs(self, task: Task, conn: ProviderConn) -> None:
        """``task`` goes to ``conn``: start moving each of its blobs there."""
        session = self.sessions.get(task.session)
        client = task.session if session is not None and session.connected else None
        for _, bid, size in task.spec.refs:
            info = self.blobs.note(task.account, bid, size)
            why = info if isinstance(info, str) else self.blobs.to_provider(
                info, conn.id, client, ("task", task.task_id))
            if why is not None:
                self._defer(lambda t=task, c=conn.id, w=why: self._blob_failed_task(t, c, w))
                return

    def _blob_failed_task(self, task: Task, provider_id: str, why: str) -> None:
        """A blob of a task placed on ``provider_id`` cannot get there: the task fails (its
        escrow returns) and the provider drops it."""
        if task.state is not TaskState.RUNNING or task.provider != provider_id:
            return
        conn = self.registry.get(provider_id)
        if conn is not None:
            conn.running.discard(task.task_id)
            conn.send(p.encode(p.Cancel(keys=[task.task_id])))
        self._fail(task, p.ErrorCode.LOST, f"task {task.key}: its data could not reach its "
                                           f"provider: {why}", "DataLost")
        self.dispatch()

    def _drop_task_blobs(self, task: Task) -> None:
        """A task ended: its own argument blobs ('t' ids) are freed wherever they are."""
        for _, bid, _ in task.spec.refs:
            if not is_content_id(bid):
                info = self.blobs.get(task.account, bid)
                if info is not None:
                    self.blobs.forget(info)

    # ------------------------------------------------------------------ results' blobs

    def _park(self, task: Task, conn: ProviderConn, result: p.Result, bufs: list) -> str | None:
        """Hold a result whose buffers stayed on the provider until they reach the client.
        Returns why the result is refused instead, or None (parked)."""
        if not may_leave_blobs(task):
            return "left result blobs behind although its assignment did not allow them"
        waiting = set()
        for _, bid, size in result.refs:
            if not is_content_id(bid):
                return "named a result blob by something other than its hash"
            info = self.blobs.note(task.account, bid, size)
            if isinstance(info, str):
                return info
            info.holders.add(conn.id)
            waiting.add(bid)
        self.parked[task.task_id] = Parked(conn.id, result, list(bufs), waiting)
        self._pull_result(task.task_id)
        return None

    def _pull_result(self, task_id: str) -> None:
        """Stream a parked result's blobs to its client, if it is connected (else on attach)."""
        parked = self.parked.get(task_id)
        task = self.tasks.get(task_id)
        if parked is None or task is None:
            return
        session = self.sessions.get(task.session)
        if session is None or not session.connected:
            return
        for bid in parked.waiting:
            info = self.blobs.get(task.account, bid)
            if info is not None:
                self.blobs.start(info, ("p", parked.provider), {("c", task.session)},
                                 ("result", task_id))

    def _pull_parked_of(self, session_id: str) -> None:
        """A session is back: its parked results stream to it now."""
        for task_id in list(self.parked):
            task = self.tasks.get(task_id)
            if task is not None and task.session == session_id:
                self._pull_result(task_id)

    def _result_blob_arrived(self, task_id: str, blob: str) -> None:
        parked = self.parked.get(task_id)
        if parked is None:
            return
        parked.waiting.discard(blob)
        if parked.waiting:
            return
        del self.parked[task_id]
        conn = self.registry.get(parked.provider)
        task = self.tasks.get(task_id)
        if conn is None or task is None:
            return  # it left meanwhile: the task was retried or failed with it
        self.unparked.add(task_id)
        try:
            self.results(conn, p.Results(results=[parked.result]), parked.buffers)
        finally:
            self.unparked.discard(task_id)
        self.blobs.let_go(task.account, [r[1] for r in parked.result.refs], conn.id)

    # ------------------------------------------------------------------ messages

    def chunk(self, peer: Peer, msg: p.Chunk, buffers: list) -> None:
        """A piece of a transfer from ``peer``: forwarded (see :class:`Blobs`)."""
        t = self.blobs.transfers.get(msg.x)
        self.pressure = self.blobs.chunk(peer, msg, buffers[0])
        if t is not None and t.purpose[0] == "result":
            task = self.tasks.get(t.purpose[1])
            if task is not None:  # a long result transfer keeps the task's lease alive
                task.lease_until = max(task.lease_until,
                                       time.monotonic() + self.limits.lease_seconds)
        self._blob_endings()

    def abort(self, peer: Peer, msg: p.Abort) -> None:
        self.blobs.abort(peer, msg)
        self._blob_endings()

    def evicted(self, conn: ProviderConn, msg: p.Evicted) -> None:
        """A provider's store let keys go: it no longer counts as their holder."""
        for key in msg.blobs:
            account, _, bid = key.partition("/")
            self.blobs.evicted(conn.id, account, bid)

    def scatter(self, session: ClientSession, msg: p.Scatter) -> None:
        """Store a client's blobs on a provider (or all eligible ones): ``Stored`` answers."""
        eligible = [c for c in self.registry
                    if not c.ad.allow or session.account in c.ad.allow]
        for bid, size in msg.blobs:
            info = self.blobs.note(session.account, bid, size)
            if isinstance(info, str):
                session.send(p.encode(p.Stored(blobs=[bid], holders=[0], errors=[info])))
                continue
            info.scattered.add(session.id)
            if msg.broadcast:
                dests = {("p", c.id) for c in eligible if c.id not in info.holders}
            elif info.holders or not eligible:
                dests = set()
            else:
                dests = {("p", min(eligible, key=lambda c: (len(c.running) / c.ad.slots,
                                                            c.id)).id)}
            dests = {d for d in dests
                     if (d[1], info.account, info.id) not in self.blobs.inbound}
            if not dests or self.blobs.start(info, ("c", session.id), dests,
                                             ("scatter", session.id)) is None:
                self._stored(session.id, info, None)
        self._blob_endings()

    def drop(self, session: ClientSession, msg: p.Drop) -> None:
        """The client holds no future for these scattered blobs any more."""
        for bid in msg.blobs:
            self.blobs.release_scattered(session.id, session.account, bid)

    def _stored(self, session_id: str, info: BlobInfo, error: str | None) -> None:
        self._send_peer(("c", session_id), p.encode(p.Stored(
            blobs=[info.id], holders=[len(info.holders)], errors=[error or ""])))

    # ------------------------------------------------------------------ endings

    def _blob_endings(self) -> None:
        """Act on every transfer that ended since the last call."""
        for ended in self.blobs.take_ended():
            kind, what = ended.transfer.purpose
            if kind == "scatter":
                self._stored(what, ended.transfer.blob, ended.error)
            elif kind == "result":
                self._result_transfer_ended(what, ended)
            elif kind == "task" and ended.error is not None:
                self._task_transfer_failed(what, ended)

    def _task_transfer_failed(self, task_id: str, ended: Ended) -> None:
        task = self.tasks.get(task_id)
        dest = next(iter(ended.transfer.dests), None)
        if task is None or dest is None or task.provider != dest[1]:
            return
        if ended.culprit is not None and ended.culprit[0] == "p":
            bad = self.registry.get(ended.culprit[1])
            if bad is not None:
                self.verifier.record(bad.account, False)
                self.standing.lost(bad.account, f"sent bytes that do not match blob "
                                                f"{ended.transfer.blob.id[:12]}…")
            ended.transfer.blob.holders.discard(ended.culprit[1])
            session = self.sessions.get(task.session)  # rescatter from the client
            if session is not None and session.connected and self.blobs.to_provider(
                    ended.transfer.blob, dest[1], task.session, ("task", task_id)) is None:
                return
        self._blob_failed_task(task, dest[1], ended.error or "")

    def _result_transfer_ended(self, task_id: str, ended: Ended) -> None:
        if ended.error is None:
            self._result_blob_arrived(task_id, ended.transfer.blob.id)
            return
        parked = self.parked.get(task_id)
        task = self.tasks.get(task_id)
        if parked is None or task is None:
            return
        if ended.culprit == ("p", parked.provider):  # wrong bytes, or it stopped on purpose
            del self.parked[task_id]
            conn = self.registry.get(parked.provider)
            if conn is not None and task.task_id in conn.running:
                conn.running.discard(task.task_id)
                self.verifier.record(conn.account, False)  # its named hash was a lie
                fails: list[Failing] = []
                self._bad_result(task, conn, ended.error or "", fails)
                self._fail_many(fails)
                self.dispatch()
        # the client went away: the result stays parked until it is back (see attach);
        # the provider went away: leave_provider retries or fails the task

