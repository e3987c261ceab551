"""Blobs on the client: ``scatter``, big arguments sent apart, big results received apart.

- ``client.scatter(obj)`` pickles ``obj`` once, names it by the SHA-256 of those bytes, and asks
  the gateway to store it on a provider (every eligible one with ``broadcast=True``). The
  returned :class:`Scattered` future pickles as a reference (``provider.scattered.resolve``), so
  a task that takes it carries 80 bytes, and the provider loads the value from its store. The
  client keeps the bytes while a future names them (it sends them again if the provider that
  held them is gone: rescatter), and tells the gateway to drop them when the last one goes.
- Argument buffers of ``BLOB_MIN`` bytes or more leave the submit frame: the gateway asks for
  them (``Want``) once the task is placed and relays them cut-through to the provider.
- Result blobs arrive as chunks before their result, and are checked against their hash.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import logging
import re
import threading
import uuid
import weakref
from dataclasses import replace
from typing import Any

import cloudpickle

from gateway import protocol as p
from gateway.blob_messages import BLOB_MIN, CHUNK_BYTES, is_content_id, splice

log = logging.getLogger(__name__)

#: Bytes of our chunks that may wait in the writer before we send more.
WINDOW = 16 * 1024 * 1024
_MARK = "decompute-scattered:"
_FIND = re.compile(rb"decompute-scattered:(s[0-9a-f]{64})")
#: Payload buffers searched for scattered references (pickle streams; big data is not).
_SCAN_BELOW = 16 * 1024 * 1024


def _resolve_marked(mark: str) -> Any:
    from provider.scattered import resolve

    return resolve(mark[len(_MARK):])


class Scattered(cf.Future):
    """A future for data that lives on providers (Dask's ``scatter`` future).

    ``key`` is the data's hash; ``result()`` is the object (this client keeps it);
    ``holders`` how many providers held it when the gateway last said. Pass it to ``submit``,
    ``map``, a ``%%decompute`` cell or a Dask graph: the task reads the value where it runs.
    """

    def __init__(self, key: str, nbytes: int, value: Any) -> None:
        super().__init__()
        self.key = key
        self.nbytes = nbytes
        self.holders = 0
        self._value = value

    @property
    def status(self) -> str:
        if not self.done():
            return "pending"
        return "error" if self.exception() else "finished"

    def __reduce__(self) -> tuple:
        return (_resolve_marked, (_MARK + self.key,))

    def __repr__(self) -> str:
        return f"<Scattered {self.key[:13]}… {self.nbytes:,} bytes, {self.status}>"


def _pack(obj: Any) -> list:
    """The object as one blob: a frame of ``[pickle stream, *out-of-band buffers]``."""
    buffers: list = []
    stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return p.frame_parts({}, [stream, *(b.raw() for b in buffers)])


class Scattering:
    """``Client``'s blob side (a mixin: it uses the client's link, loop and book)."""

    def _init_blobs(self) -> None:
        self._outgoing: dict[str, list] = {}  # blob id -> parts this client can send
        self._scattered: weakref.WeakValueDictionary[str, Scattered] = (
            weakref.WeakValueDictionary())
        self._scatter_lock = threading.Lock()
        self._assembling: dict[int, tuple[str, Any, list[int]]] = {}
        self._arrived: dict[str, Any] = {}
        self._streams: dict[int, asyncio.Task] = {}

    # ------------------------------------------------------------------ scatter

    def scatter(self, obj: Any, broadcast: bool = False) -> Scattered:
        """Store ``obj`` on a provider (on every eligible one with ``broadcast=True``) and
        return a future for it; tasks that take the future read it where they run. Scattering
        the same object again sends nothing: the same future comes back."""
        self._check_ready()
        parts = _pack(obj)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        key = "s" + digest.hexdigest()
        size = sum(memoryview(b).nbytes for b in parts)
        with self._scatter_lock:
            fut = self._scattered.get(key)
            if fut is not None and not broadcast:
                return fut
            if fut is None:
                fut = Scattered(key, size, obj)
                self._scattered[key] = fut
                self._outgoing[key] = parts
                weakref.finalize(fut, self._drop_scattered, key)
        self._send_soon(p.encode(p.Scatter(blobs=[[key, size]], broadcast=broadcast)))
        return fut

    def _drop_scattered(self, key: str) -> None:
        """The last future for ``key`` is gone (GC thread): forget the bytes, tell the gateway."""
        self._outgoing.pop(key, None)
        self._send_soon(p.encode(p.Drop(blobs=[key])))

    # ------------------------------------------------------------------ submitting

    def _with_blobs(self, specs: list[p.TaskSpec], payloads: list[list]
                    ) -> tuple[list[p.TaskSpec], list[list]]:
        """Big argument buffers leave the frame as blobs; scattered references are listed."""
        out_specs, out_payloads = [], []
        for spec, payload in zip(specs, payloads, strict=True):
            refs = self._scattered_refs(payload)
            inline = []
            for pos, buf in enumerate(payload):
                size = memoryview(buf).nbytes
                if size >= BLOB_MIN and not spec.items:
                    bid = "t" + uuid.uuid4().hex
                    self._outgoing[bid] = [buf]
                    refs.append([pos, bid, size])
                else:
                    inline.append(buf)
            if refs:
                spec = replace(spec, refs=refs, nb=len(inline))
                payload = inline
            out_specs.append(spec)
            out_payloads.append(payload)
        return out_specs, out_payloads

    def _scattered_refs(self, payload: list) -> list:
        if not len(self._scattered):
            return []
        found: dict[str, None] = {}
        for buf in payload:
            view = memoryview(buf)
            if view.nbytes < _SCAN_BELOW:
                found.update((m.group(1).decode(), None) for m in _FIND.finditer(view))
        refs = []
        for key in found:
            fut = self._scattered.get(key)
            if fut is not None:
                refs.append([-1, key, fut.nbytes])
        return refs

    def _track_arguments(self, futures: list, specs: list[p.TaskSpec]) -> None:
        """Each task's own argument blobs are let go once its future is done."""
        for fut, spec in zip(futures, specs, strict=True):
            if spec.refs:
                fut.add_done_callback(lambda _f, s=spec: self._release_arguments(s))

    def _release_arguments(self, spec: p.TaskSpec) -> None:
        """A task ended: its own argument blobs are not needed any more."""
        for _, bid, _ in spec.refs:
            if not is_content_id(bid):
                self._outgoing.pop(bid, None)

    # ------------------------------------------------------------------ loop thread

    def _on_blob_message(self, msg: p.Message, buffers: list[memoryview]) -> bool:
        if isinstance(msg, p.Want):
            self._on_want(msg)
        elif isinstance(msg, p.Chunk):
            self._on_chunk(msg, buffers[0])
        elif isinstance(msg, p.Abort):
            self._assembling.pop(msg.x, None)
            task = self._streams.pop(msg.x, None)
            if task is not None:
                task.cancel()
        elif isinstance(msg, p.Stored):
            self._on_stored(msg)
        else:
            return False
        return True

    def _on_want(self, msg: p.Want) -> None:
        parts = self._outgoing.get(msg.blob)
        if parts is None:
            self._link.send(p.encode(p.Abort(
                x=msg.x, reason=f"this client no longer holds {msg.blob[:12]}…")))
            return
        task = self._loop.create_task(self._stream(msg, parts))
        self._streams[msg.x] = task
        task.add_done_callback(lambda _t, x=msg.x: self._streams.pop(x, None))

    async def _stream(self, msg: p.Want, parts: list) -> None:
        size = sum(memoryview(b).nbytes for b in parts)
        offset = 0
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, CHUNK_BYTES):
                if not self._link.connected:
                    return  # the transfer ended with the connection
                piece = view[start:start + CHUNK_BYTES]
                self._link.send(p.transient(p.encode_parts(p.Chunk(
                    x=msg.x, blob=msg.blob, size=size, offset=offset), [piece])))
                offset += piece.nbytes
                await self._link.drained(WINDOW)

    def _on_chunk(self, msg: p.Chunk, data: memoryview) -> None:
        entry = self._assembling.get(msg.x)
        if entry is None:
            if msg.offset:
                return
            entry = self._assembling[msg.x] = (msg.blob, p.scratch(msg.size), [0])
        blob, buf, got = entry
        end = msg.offset + data.nbytes
        if msg.offset != got[0] or end > len(buf):
            self._assembling.pop(msg.x, None)
            return
        buf[msg.offset:end] = data
        got[0] = end
        if end == len(buf):
            del self._assembling[msg.x]
            if is_content_id(blob) and "s" + hashlib.sha256(buf).hexdigest() != blob:
                log.error("result data %s… does not match its hash: dropped", blob[:12])
                return
            self._arrived[blob] = buf

    def _on_stored(self, msg: p.Stored) -> None:
        for i, key in enumerate(msg.blobs):
            fut = self._scattered.get(key)
            if fut is None or fut.done():
                continue
            error = msg.errors[i] if i < len(msg.errors) else ""
            fut.holders = msg.holders[i] if i < len(msg.holders) else 0
            if error:
                fut.set_exception(RuntimeError(f"scatter failed: {error}"))
            else:
                fut.set_result(fut._value)

    def _result_buffers(self, result: p.Result, buffers: list) -> list | None:
        """A result's buffers with its blobs put back in place; None if one did not arrive
        intact."""
        blobs = {}
        for _, bid, _ in result.refs:
            data = self._arrived.pop(bid, None)
            if data is None:
                return None
            blobs[bid] = memoryview(data)
        return splice(list(buffers), result.refs, blobs)
