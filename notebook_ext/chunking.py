"""The chunked ``map``: sizing chunks, packing items into them, fanning a chunk's one result out.

``Client.map`` sends many small items as few remote tasks (one escrow, one process hand-off, one
settlement each) while every item keeps its own future. This is kept apart from ``client`` because
it is one self-contained policy (joblib/``multiprocessing``-style chunk sizing plus the
bookkeeping of :class:`~notebook_ext.futures.Chunk`); ``Client`` gets it as a mixin so its
methods, state and names stay exactly as before.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from gateway import protocol as p
from notebook_ext import errors
from notebook_ext.futures import Chunk, Future, RawResult
from notebook_ext.serialize import dumps_args, rebuild_error

#: The client's logger: these messages are the client's (tests and users filter on it).
log = logging.getLogger("notebook_ext.client")

#: Tasks per Submit frame in ``map``: bounds one frame's header to a few hundred KiB.
MAP_BATCH = 1000
#: Argument buffers per Submit frame of a chunked ``map`` (a frame carries at most 65,536).
MAP_FRAME_BUFFERS = 50_000
#: ``chunksize="auto"``: chunks per provider slot online, at least (as ``multiprocessing``'s
#: ``Pool.map``: enough chunks that every slot stays busy and the last ones end together).
CHUNKS_PER_SLOT = 4
#: ``chunksize="auto"``: run time a chunk aims at once the function's has been measured (as
#: joblib's ``batch_size="auto"``: long enough that per-task costs vanish, short enough that
#: progress, cancel and load balancing stay fine-grained).
CHUNK_TARGET_SECONDS = 0.05
#: ``chunksize="auto"``: items per chunk at most.
MAX_AUTO_CHUNK = 256
#: Seconds the count of provider slots online is reused between ``map`` calls.
SLOTS_TTL = 5.0


class ChunkedMap:
    """``Client``'s chunk methods (a mixin: they use the client's link, book and loop)."""

    def _chunk_size(self, chunksize: int | str, func_hash: str, n: int) -> int:
        """Items per chunk for a map of ``n`` items (1: no chunks)."""
        if chunksize != "auto" and (not isinstance(chunksize, int) or isinstance(chunksize, bool)
                                    or not 1 <= chunksize <= p.MAX_ITEMS):
            raise ValueError(f"chunksize must be 'auto' or an int from 1 to {p.MAX_ITEMS}, got "
                             f"{chunksize!r}")
        welcome = self._link.welcome
        if n <= 1 or welcome is None or "chunks" not in welcome.features:
            if chunksize not in ("auto", 1) and n > 1:
                log.warning("the gateway at %s does not run chunks of a map; each item runs as "
                            "its own task", self.address)
            return 1
        if chunksize != "auto":
            return min(int(chunksize), n)
        size = -(-n // (CHUNKS_PER_SLOT * self._slots_online()))
        per_item = self._per_item.get(func_hash)
        if per_item:
            size = min(size, int(CHUNK_TARGET_SECONDS / per_item))
        return max(1, min(size, MAX_AUTO_CHUNK))

    def _slots_online(self) -> int:
        """Task slots of the providers online (cached a few seconds; 1 if unknown)."""
        now = self._loop.time()
        if now - self._slots[1] > SLOTS_TTL:
            try:
                slots = sum(max(1, info.slots) for info in self.providers() if info.online)
            except (ConnectionError, errors.GatewayRefused) as exc:
                log.debug("provider slots unknown (%s); chunks sized for one", exc)
                slots = 1
            self._slots = (max(1, slots), now)
        return self._slots[0]

    def _map_chunks(self, func_hash: str, blob: bytes, items: list[tuple], kwargs: dict,
                    keys: list[str], size: int, opts: dict, trust: bool | None) -> list[Future]:
        """Submit ``items`` in chunks of ``size``: a future per item, a task per chunk."""
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        trust = self.trust if trust is None else trust
        futures = [Future(self, k, trust) for k in keys]
        batch: list[tuple[Chunk, p.TaskSpec, list]] = []
        buffers = 0
        for start in range(0, len(items), size):
            group = futures[start:start + size]
            args = [dumps_args(item, kwargs) for item in items[start:start + size]]
            chunk_key = f"{keys[start]}~{len(group)}"  # an item key of the user's, and more
            if len(chunk_key) > 200:  # the gateway takes keys of up to 239 characters
                chunk_key = f"chunk-{uuid.uuid4().hex}~{len(group)}"
            chunk = Chunk(chunk_key, func_hash, group)
            spec, payload = self._chunk_task(chunk.key, func_hash, args, opts)
            if batch and (len(batch) >= MAP_BATCH or buffers + len(payload) > MAP_FRAME_BUFFERS):
                self._send_chunks(batch, func_hash, blob)
                batch, buffers = [], 0
            batch.append((chunk, spec, payload))
            buffers += len(payload)
        if batch:
            self._send_chunks(batch, func_hash, blob)
        return futures

    def _chunk_task(self, key: str, func_hash: str, args: list[list], opts: dict
                    ) -> tuple[p.TaskSpec, list]:
        """One chunk's spec: its items' argument streams back to back (``parts`` says where
        each starts); ``budget`` and ``timeout`` per item become the chunk's."""
        n = len(args)
        per_chunk = dict(opts)
        if opts.get("budget") is not None:
            per_chunk["budget"] = opts["budget"] * n
        if opts.get("timeout") is not None:
            per_chunk["timeout"] = min(opts["timeout"] * n, 1e7)
        payload = [b for a in args for b in a]
        spec, _ = self._task(key, func_hash, payload, per_chunk)
        return replace(spec, items=n, parts=[len(a) for a in args]), payload

    def _send_chunks(self, batch: list[tuple[Chunk, p.TaskSpec, list]], func_hash: str,
                     blob: bytes) -> None:
        chunks, specs, payloads = (list(x) for x in zip(*batch, strict=True))
        specs, payloads = self._with_blobs(specs, payloads)
        frame = self._submit_frame(specs, payloads, {func_hash: blob})
        self._book.add(chunks, specs, payloads, {func_hash: blob})
        self._send_soon(frame)
        futures = [f for chunk in chunks for f in chunk.live()]
        for listener in self._submit_listeners:
            listener(futures)

    def _on_chunk_result(self, chunk: Chunk, result: p.Result, buffers: list[memoryview]) -> None:
        """A chunk's one result: each item's future gets its own outcome and its share."""
        chunk._settled(result.provider, result.usage, result.cost, result.receipt)
        wall = result.usage.get("wall_seconds")
        if result.status == "finished" and wall:  # joblib-style: remember the time per item
            old = self._per_item.get(chunk.func)
            now = wall / chunk.n
            self._per_item[chunk.func] = now if old is None else (old + now) / 2
        if result.status == "cancelled":
            chunk._cancel_locally()
            return
        live = {f._item: f for f in chunk.live()}
        if result.status != "finished" or result.items != chunk.n:
            for fut in live.values():
                fut._fail(rebuild_error(result.error, result.code) if result.status != "finished"
                          else errors.GatewayRefused(
                              f"the gateway answered chunk {chunk.key} of {chunk.n} items with "
                              f"{result.items} item outcomes; its items' results are unknown. "
                              f"Map with chunksize=1 on this gateway"))
            return
        failed = dict(zip(result.failed, result.errors, strict=True))
        pos = 0
        for i, n in enumerate(result.parts):
            fut = live.get(i)
            if fut is not None and not fut.done():
                if i in failed:
                    fut._fail(rebuild_error(failed[i], None))
                else:
                    bufs = buffers[pos:pos + n]
                    fut._finish(RawResult(bufs), sum(b.nbytes for b in bufs))
            pos += n
