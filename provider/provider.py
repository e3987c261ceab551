"""The provider: dials out to the gateway, runs assigned tasks in sandboxed workers, reports back.

It never runs client code in its own process or event loop: every payload goes to a worker of
:class:`provider.pool.WorkerPool`. It keeps its key to itself (workers cannot see it) and reports
usage it measured, not usage a task claims.

Use it as ``decompute-provider`` (see ``provider.__main__``), as ``await Provider(...).serve()``,
or in the background of a notebook kernel with ``start()``/``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import platform
import socket
import threading
from collections import OrderedDict
from collections.abc import Sequence

import cloudpickle
import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway import protocol as p
from gateway.identity import Identity, decompute_home
from gateway.transport import PING_INTERVAL, PING_TIMEOUT, FrameWriter, handshake
from provider.dask_backend import SANDBOX_NOTE, DaskBackend
from provider.pool import Outcome, WorkerPool
from provider.sandbox import Limits, describe, probe_isolation
from provider.store import ResultStore

log = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8765"
ACCEPTED = frozenset({"assign", "cancel", "error", "reply", "fetch", "data", "release"})
#: Usage of running tasks is reported this often (the gateway settles on these totals).
HEARTBEAT_SECONDS = 0.5
#: A task still running after this long is reported as running (quicker ones just finish).
RUNNING_EVENT_DELAY = 0.01
#: Heartbeats between two status lines in the provider's log (the CLI's status line).
STATUS_EVERY = 20
#: Query id of the periodic "earnings" question (replies to it update ``Provider.earnings``).
EARNINGS_QUERY = 1
#: Function blobs kept (FIFO). The gateway remembers a quarter as many as sent to us.
FUNC_BLOBS_KEPT = 2048
#: Largest message we accept from the gateway (a task's arguments come in one message).
MAX_MESSAGE = 1024 * 1024 * 1024


def local_runtime() -> p.Runtime:
    return p.Runtime(python=".".join(platform.python_version_tuple()[:2]),
                     cloudpickle=cloudpickle.__version__)


def failure(key: str, type_: str, module: str, message: str, code: str) -> p.Result:
    return p.Result(key=key, status="error", code=code,
                    error=p.RemoteFailure(type=type_, module=module, message=message))


class Provider:
    """A volunteer's provider: ``cpus`` task slots, each a sandboxed worker process."""

    def __init__(self, url: str | None = None, *, name: str | None = None,
                 cpus: int | None = None, memory: int | None = None, gpus: int = 0,
                 price_cpu: float = 0.0, price_memory: float = 0.0, price_gpu: float = 0.0,
                 allow: Sequence[str] = (), home: str | os.PathLike | None = None,
                 reconnect: bool = True, dask_scheduler: str | None = None) -> None:
        self.url = url or os.environ.get("DECOMPUTE_GATEWAY") or DEFAULT_URL
        self.home = decompute_home() if home is None else home
        self.identity = Identity.load_or_create(self.home)
        self.cpus = cpus or os.cpu_count() or 1
        self.memory = memory or psutil.virtual_memory().total
        self.isolation = probe_isolation()
        #: Front this Dask cluster (``provider.dask_backend``) instead of local task processes.
        self.dask_scheduler = dask_scheduler
        self.ad = p.ProviderAd(
            name=name or f"{socket.gethostname()}-{os.getpid()}", cpus=self.cpus,
            memory=self.memory, gpus=gpus, runtime=local_runtime(),
            prices={"cpu": price_cpu, "memory": price_memory, "gpu": price_gpu},
            sandbox="weak" if dask_scheduler else self.isolation.strength,
            allow=list(allow), slots=self.cpus,
        )
        self.reconnect = reconnect
        self.id: str | None = None
        self.connected = threading.Event()
        self.served = 0
        self.cpu_seconds = 0.0  # CPU its tasks used, as metered
        self._earnings = 0.0
        self._funcs: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Task] = {}
        self.store = ResultStore()
        self._cancelled: set[str] = set()
        self._pool: WorkerPool | DaskBackend | None = None
        self._writer: FrameWriter | None = None
        self._results: list[tuple[p.Result, list[memoryview]]] = []
        self._events: list[p.Event] = []
        self._flush_pending = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifetime

    async def serve(self) -> None:
        """Run until :meth:`stop`: keep a connection to the gateway, reconnecting with backoff."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.dask_scheduler:
            log.warning("provider %s: %s", self.ad.name, SANDBOX_NOTE)
            self._pool = DaskBackend(self.dask_scheduler, slots=self.cpus)
        else:
            log.info("provider %s: %s", self.ad.name, describe(self.isolation))
            per_worker = self.memory // self.cpus
            self._pool = WorkerPool(self.cpus, Limits(memory_bytes=per_worker),
                                    self.isolation, hide_paths=[self.home])
        await self._pool.start()
        try:
            delay = 0.2
            while not self._stop.is_set():
                try:
                    await self._session()
                    delay = 0.2
                except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
                    log.warning("provider %s: connection to %s failed: %s", self.ad.name,
                                self.url, exc)
                except p.ProtocolError as exc:
                    log.error("provider %s: gateway refused us: %s", self.ad.name, exc)
                if not self.reconnect:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, 10.0)
        finally:
            await self._pool.close()

    async def _session(self) -> None:
        """One connection: handshake, then read assignments until it closes or we stop."""
        async with connect(self.url, compression=None, max_size=MAX_MESSAGE,
                           ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT) as ws:
            welcome = await handshake(ws, self.identity, "provider", ad=self.ad,
                                      name=self.ad.name)
            self.id = welcome.session
            self._writer = FrameWriter(ws)
            log.info("provider %s connected to %s as %s", self.ad.name, self.url, self.id)
            self.connected.set()
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._writer.run()),
                             tg.create_task(self._heartbeats())]
                    stopper = tg.create_task(self._stop.wait())
                    reader = tg.create_task(self._read(ws, tg))
                    await asyncio.wait({stopper, reader}, return_when=asyncio.FIRST_COMPLETED)
                    for t in [*tasks, stopper, reader, *self._running.values()]:
                        t.cancel()
            finally:
                self.connected.clear()
                self._writer = None
                self._running.clear()

    async def _read(self, ws, tg: asyncio.TaskGroup) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                try:
                    msg, buffers = p.decode(data, allowed=ACCEPTED)
                except p.ProtocolError as exc:  # a gateway we cannot understand: leave, retry
                    log.error("provider %s: bad frame from the gateway: %s", self.ad.name, exc)
                    await ws.close(1008, exc.reason)
                    return
                if isinstance(msg, p.Assign):
                    self._accept(msg, buffers, tg)
                elif isinstance(msg, p.Cancel):
                    self._cancel(msg.keys)
                elif isinstance(msg, p.Reply):
                    self._on_reply(msg)
                elif isinstance(msg, p.Fetch):
                    self._send_data(msg.keys)
                elif isinstance(msg, p.Data):
                    for key, bufs in zip(msg.keys, p.split_buffers(msg.nbs, buffers), strict=True):
                        self.store.put(key, bufs)
                elif isinstance(msg, p.Release):
                    for key in msg.keys:
                        self.store.release(key)
                elif isinstance(msg, p.Error):
                    log.warning("gateway says %s: %s", msg.code, msg.message)

    def _output(self, key: str, started: asyncio.TimerHandle, stream: str, text: str) -> None:
        """Streamed output; the task is announced as running first if it was not yet."""
        if not started.cancelled() and started.when() > asyncio.get_running_loop().time():
            started.cancel()
            self._emit(p.Event(key=key, kind="running"))
        self._emit(p.Event(key=key, kind="output", stream=stream, text=text))

    def _send_data(self, keys: Sequence[str]) -> None:
        """Answer a fetch with the kept results we hold (and name the ones we do not)."""
        found = [(k, self.store.get(k)) for k in keys]
        have = [(k, bufs) for k, bufs in found if bufs is not None]
        missing = [k for k, bufs in found if bufs is None]
        if self._writer is not None:
            self._writer.send(p.encode_parts(
                p.Data(keys=[k for k, _ in have], nbs=[len(b) for _, b in have], missing=missing),
                [b for _, bufs in have for b in bufs]))

    def _on_reply(self, msg: p.Reply) -> None:
        if msg.data is not None and msg.id == EARNINGS_QUERY:
            self._earnings = float(msg.data)

    @property
    def earnings(self) -> float:
        """Tokens this provider's account has earned (after the gateway's fee), as last heard."""
        return self._earnings

    def _cancel(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key in self._running:
                self._cancelled.add(key)
                self._running[key].cancel()

    def start(self, timeout: float = 60.0) -> Provider:
        """Serve in a background thread (own event loop); return once connected."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()),
                                        name=f"decompute-provider-{self.ad.name}", daemon=True)
        self._thread.start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"provider could not register with {self.url} in {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: running tasks are killed (the gateway re-queues them), workers end."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------ tasks

    def _accept(self, msg: p.Assign, buffers: list[memoryview], tg: asyncio.TaskGroup) -> None:
        for func_hash, blob in zip(msg.funcs, buffers[: len(msg.funcs)], strict=True):
            self._funcs[func_hash] = bytes(blob)
            if len(self._funcs) > FUNC_BLOBS_KEPT:
                self._funcs.popitem(last=False)
        payloads = p.split_buffers([t.nb for t in msg.tasks], buffers[len(msg.funcs):])
        for spec, payload in zip(msg.tasks, payloads, strict=True):
            self._running[spec.key] = tg.create_task(self._execute(spec, payload))

    async def _execute(self, a: p.Assignment, payload: list[memoryview]) -> None:
        """Run one assignment and report it. Cancellation at any point (waiting for inputs or
        a worker, or running) is reported as ``cancelled`` when the gateway asked for it."""
        assert self._pool is not None
        worker, broken, usage = None, False, {}
        try:
            blob = self._funcs.get(a.func)
            if blob is None:
                self._finish(failure(a.key, "RuntimeError", "builtins",
                                     f"function {a.func} was never sent to this provider",
                                     "internal"))
                return
            deps = None
            if a.deps is not None:  # a graph task: wait (without a worker) for its inputs
                deps = [(d, await self.store.wait(d)) for d in a.deps]
            worker = await self._pool.acquire(a.account)
            # Tell the client it runs only if it still does shortly: a map of tiny tasks would
            # otherwise send an extra message per task through the gateway.
            started = asyncio.get_running_loop().call_later(
                RUNNING_EVENT_DELAY, self._emit, p.Event(key=a.key, kind="running"))
            try:
                async with asyncio.timeout(a.timeout):
                    outcome = await self._pool.run(
                        worker, a.key, a.func, memoryview(blob), payload,
                        lambda stream, text: self._output(a.key, started, stream, text),
                        memory=a.resources.get("memory"), deps=deps,
                        gpus=min(a.resources.get("gpus", 0), self.ad.gpus))
            except TimeoutError:
                broken = True
                usage = worker.meter.sample() if worker.meter else {}
                await self._pool.kill(worker)
                outcome = Outcome("error", code="timeout", usage=usage, error={
                    "type": "TimeoutError", "module": "builtins", "traceback": "",
                    "message": f"task {a.key.split('/')[-1]} exceeded its timeout of "
                               f"{a.timeout:g} s; its process was killed"})
            started.cancel()
            broken = broken or outcome.code == "worker_died"
            self._finish(*self._result(a, outcome))
        except asyncio.CancelledError:
            if worker is not None:
                broken = True
                usage = worker.meter.sample() if worker.meter else {}
                await self._pool.kill(worker)
            if a.key not in self._cancelled:
                raise  # we are shutting down, not cancelling one task
            self._finish(p.Result(key=a.key, status="cancelled", code="cancelled", usage=usage))
        finally:
            self._cancelled.discard(a.key)
            self._running.pop(a.key, None)
            if worker is not None:
                self.served += 1
                await self._pool.release(worker, broken=broken)

    def _result(self, a: p.Assignment, outcome: Outcome) -> tuple[p.Result, list[memoryview]]:
        """The report of a task; a kept result stays in the store and is sent only if asked."""
        error = p.RemoteFailure.from_wire(outcome.error) if outcome.error else None
        buffers, stored, nbytes = outcome.buffers, False, 0
        if a.keep and outcome.status == "finished":
            self.store.put(a.key, buffers)
            stored, nbytes = True, sum(b.nbytes for b in buffers)
            buffers = buffers if a.send else []
        return p.Result(key=a.key, status=outcome.status, nb=len(buffers), error=error,
                        code=outcome.code, usage=outcome.usage, stored=stored,
                        nbytes=nbytes), buffers

    # ------------------------------------------------------------------ reporting

    def _finish(self, result: p.Result, buffers: Sequence[memoryview] = ()) -> None:
        self.cpu_seconds += result.usage.get("cpu_seconds", 0.0)
        self._results.append((result, list(buffers)))
        self._schedule_flush()

    def _emit(self, event: p.Event) -> None:
        self._events.append(event)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Batch what finishes in one loop iteration into one frame of each kind."""
        if not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._writer is None:
            self._events.clear()
            self._results.clear()  # the gateway re-queues tasks of a lost connection
            return
        if self._events:
            self._writer.send(p.encode(p.Events(events=self._events)))
            self._events = []
        if self._results:
            results, self._results = self._results, []
            self._writer.send(p.encode_parts(p.Results(results=[r for r, _ in results]),
                                             [b for _, bufs in results for b in bufs]))

    async def _heartbeats(self) -> None:
        psutil.cpu_percent()  # prime: the first reading is meaningless
        for beat in itertools.count():
            await asyncio.sleep(HEARTBEAT_SECONDS)
            assert self._pool is not None and self._writer is not None
            usage = {w.task_key: w.meter.sample(tree=True) for w in self._pool.workers
                     if w.meter is not None and w.task_key}
            load = {"cpu_percent": psutil.cpu_percent(),
                    "memory_percent": psutil.virtual_memory().percent,
                    "running": float(len(self._running))}
            self._writer.send(p.encode(p.Heartbeat(load=load, usage=usage)))
            if beat % 4 == 0:
                self._writer.send(p.encode(p.Query(id=EARNINGS_QUERY, what="earnings")))
            if beat % STATUS_EVERY == 0 and beat:
                log.info("provider %s: %d tasks served, %d running, %.6f tokens earned",
                         self.ad.name, self.served, len(self._running), self._earnings)
