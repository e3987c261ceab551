"""What arrives from the gateway, on the client's loop thread: results, events, outages, resumes.

Kept apart from ``client`` because it is one concept, the inbound side of the connection:
settling futures from Results and Events, warning about and timing out an outage, and submitting
again what a restarted gateway forgot. ``Client`` gets it as a mixin so its methods, state and
names stay exactly as before.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import sys
from dataclasses import replace

from gateway import protocol as p
from notebook_ext import errors, spot_checks
from notebook_ext.chunking import MAP_BATCH
from notebook_ext.futures import Chunk, RawResult, StoredResult
from notebook_ext.serialize import rebuild_error

#: The client's logger: these messages are the client's (tests and users filter on it).
log = logging.getLogger("notebook_ext.client")

#: Separates a graph key from its submission token (``notebook_ext.dask_integration``).
_GRAPH_SEP = "#"


class Incoming:
    """``Client``'s loop-thread handlers (a mixin: they use the client's book, link and loop)."""

    def _on_message(self, msg: p.Message, buffers: list[memoryview]) -> None:
        if self._on_blob_message(msg, buffers):
            return
        if isinstance(msg, p.Results):
            groups = p.split_buffers([r.nb for r in msg.results], buffers)
            for result, bufs in zip(msg.results, groups, strict=True):
                self._on_result(result, bufs)
        elif isinstance(msg, p.Events):
            for event in msg.events:
                self._on_event(event)
        elif isinstance(msg, p.Reply):
            reply = self._book.reply(msg.id)
            if reply is not None and not reply.done():
                reply.set_result(msg)
        elif isinstance(msg, p.Error):
            log.warning("gateway: %s: %s", msg.code, msg.message)

    def _on_result(self, result: p.Result, buffers: list[memoryview]) -> None:
        if result.refs:  # its big buffers came ahead as blobs
            whole = self._result_buffers(result, buffers)
            if whole is None:
                result = replace(result, status="error", code=p.ErrorCode.LOST.value,
                                 refs=[], error=p.RemoteFailure(
                                     type="DataLost", module="decompute",
                                     message="the result's data did not arrive intact"))
            buffers = whole or []
        waiter = self._book.fetched(result.key)
        if waiter is not None:  # the answer to a fetch
            if result.status == "finished":
                waiter.set_result(buffers)
            else:
                waiter.set_exception(rebuild_error(result.error, result.code))
        if result.receipt:
            self._receipt_book.add(result.receipt)
        if spot_checks.late(self, result):  # news of a result delivered earlier, not an outcome
            return
        fut = self._book.take(result.key)
        spot_checks.note(self, result, None if isinstance(fut, Chunk) else fut)
        if isinstance(fut, Chunk):
            self._on_chunk_result(fut, result, buffers)
            return
        if result.status == "error" and _GRAPH_SEP in result.key:
            self._note_failure(result)
        if fut is None or fut.done():
            return
        fut._settled(result.provider, result.usage, result.cost, result.receipt)
        if result.verification:  # what the gateway checked (a refereed run's verdict)
            fut.verification = dict(result.verification) if result.verification else None
        if result.status == "finished":
            value = (StoredResult(result.key, result.nbytes) if result.stored and not result.nb
                     else RawResult(buffers))
            fut._finish(value, result.nbytes)
        elif result.status == "cancelled":
            fut._cancel_locally()
        else:
            fut._fail(rebuild_error(result.error, result.code))

    def _note_failure(self, result: p.Result) -> None:
        """Keep the first failure of each graph submission (see :class:`FirstFailures`)."""
        token = result.key.rpartition(_GRAPH_SEP)[2]
        self._failures.note(token, result.key, rebuild_error(result.error, result.code))

    def first_failure(self, token: str) -> tuple[str, BaseException] | None:
        """The first task failure of the graph submission ``token`` (its key and error)."""
        return self._failures.get(token)

    def _on_event(self, event: p.Event) -> None:
        fut = self._book.get(event.key)
        if fut is None:
            return
        if event.kind == "running":
            fut._started(event.provider)
        elif event.kind == "retrying":
            fut._requeued()
        elif event.kind == "usage":
            fut._metered(event.usage, event.cost)
        elif event.kind == "output" and event.text:
            fut._printed(event.stream or "stdout", event.text)
            if self.stream_output:
                stream = sys.stderr if event.stream == "stderr" else sys.stdout
                stream.write(event.text)

    def _on_down(self, error: BaseException | None) -> None:
        """The gateway is unreachable (loop thread): say so once, arm ``reconnect_for``."""
        if not self._warned:
            self._warned = True
            log.warning("lost the decompute gateway at %s; reconnecting with backoff for as long "
                        "as this client is open (client.status). submit() raises "
                        "ConnectionError until it is back%s", self.address,
                        "" if not self.queue_while_disconnected else " (queued: sent then)")
        if self.reconnect_for is not None and self._give_up is None:
            self._give_up = self._loop.call_later(self.reconnect_for, self._fail_waiting)

    def _fail_waiting(self) -> None:
        """``reconnect_for`` ran out: the futures still waiting fail (the link keeps trying)."""
        error = self._link.last_error
        for fut in self._book.take_all():
            fut._fail(ConnectionError(
                f"no connection to the gateway at {self.address} for {self.reconnect_for:g} s "
                f"(reconnect_for): {error!r}; submit the task again once it is back"))

    def _on_resumed(self) -> None:
        """After a reconnect (loop thread): ask which tasks the gateway no longer knows (it
        restarted, or a submission was lost on the way) and submit those again, same keys."""
        if self._give_up is not None:
            self._give_up.cancel()
            self._give_up = None
        if self._warned:
            log.warning("reconnected to the decompute gateway at %s", self.address)
            self._warned = False
        keys = self._book.keys()
        if not keys:
            return
        req_id = next(self._ids)
        reply = self._book.expect_reply(req_id)
        reply.add_done_callback(self._resubmit_unknown)  # set on this loop thread: runs here
        self._link.send(p.encode(p.Query(id=req_id, what="resume", args={"keys": keys})))

    def _resubmit_unknown(self, done: cf.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        unknown = done.result().data.get("unknown", [])
        again, lost = self._book.resubmission(unknown)
        for key in lost:
            fut = self._book.take(key)
            if fut is not None:
                fut._fail(errors.ProviderLost(
                    f"the gateway lost graph task {key} (it restarted) together with the inputs "
                    f"it needed; compute the graph again"))
        for start in range(0, len(again.specs), MAP_BATCH):
            specs = again.specs[start:start + MAP_BATCH]
            used = {spec.func for spec in specs}
            funcs = {h: b for h, b in again.funcs.items() if h in used}
            frame = self._submit_frame(specs, again.payloads[start:start + MAP_BATCH], funcs)
            self._link.send(frame)
        if again.specs:
            log.warning("submitted %d unfinished task(s) again after the gateway came back",
                        len(again.specs))
