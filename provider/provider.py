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
import logging
import os
import platform
import signal
import socket
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import cloudpickle
import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from gateway import protocol as p
from gateway.identity import Identity, decompute_home
from gateway.transport import PING_INTERVAL, PING_TIMEOUT, FrameWriter, handshake
from provider.blob_io import BlobIO
from provider.dask_backend import SANDBOX_NOTE, DaskBackend
from provider.environments import (
    Environment,
    EnvironmentBuildError,
    Environments,
    advertised_packages,
)
from provider.outbox import (
    OUTPUT_LIMIT,
    TaskOutput,
    clip,
    data_frames,
    result_too_big,
)
from provider.pool import Outcome, WorkerPool
from provider.reporting import EARNINGS_QUERY, Reporting
from provider.reporting import HEARTBEAT_SECONDS as HEARTBEAT_SECONDS
from provider.reporting import IDLE_HEARTBEAT_EVERY as IDLE_HEARTBEAT_EVERY
from provider.reporting import PACKAGES_EVERY as PACKAGES_EVERY
from provider.reporting import STATUS_EVERY as STATUS_EVERY
from provider.reporting import tokens_at as tokens_at
from provider.salvage import salvage_assign
from provider.sandbox import Limits, describe, probe_isolation
from provider.spares import Spares
from provider.store import ResultStore, StoreFull

log = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8765"
ACCEPTED = frozenset({"assign", "cancel", "error", "reply", "fetch", "data", "release", "want",
                      "chunk", "abort", "drop"})
#: The store's default bound: this fraction of the memory the provider offers.
STORE_FRACTION = 0.25
#: Spare memory files (``provider.spares``) hold at most the store's bound divided by this.
SPARE_SHARE = 4
#: A task still running after this long is reported as running (quicker ones just finish).
RUNNING_EVENT_DELAY = 0.01
#: Function blobs kept (FIFO). The gateway remembers a quarter as many as sent to us.
FUNC_BLOBS_KEPT = 2048
#: Largest message we accept from the gateway (a task's arguments come in one message).
MAX_MESSAGE = 1024 * 1024 * 1024
#: The gateway's message limit when its welcome does not name one (its default).
GATEWAY_MAX_MESSAGE = 512 * 1024 * 1024
#: On a graceful stop, how long to wait for the last earnings figure and for queued frames.
HAND_BACK_SECONDS = 3.0


def local_runtime() -> p.Runtime:
    return p.Runtime(python=".".join(platform.python_version_tuple()[:2]),
                     cloudpickle=cloudpickle.__version__)


def failure(key: str, type_: str, module: str, message: str, code: str,
            usage: dict | None = None) -> p.Result:
    return p.Result(key=key, status="error", code=code, usage=dict(usage or {}),
                    error=p.RemoteFailure(type=type_, module=module, message=message))


def refusal(key: str, message: str, code: str = p.ErrorCode.LIMIT.value) -> p.Result:
    """This provider will not run the task: an answer for it, so the gateway can place it
    elsewhere or fail it, instead of a broken connection."""
    return failure(key, "ProviderRefused", "decompute", message, code)


def default_name(account: str) -> str:
    """This host and account: the same at every start, so the provider keeps its name (and its
    id, which the gateway derives from name and account) across restarts."""
    return f"{socket.gethostname()[:48]}-{account[:6]}"


@dataclass(slots=True)
class _Slot:
    """The worker one assignment holds, once it has one, and whether it must be replaced."""

    worker: object | None = None
    broken: bool = False
    reported: bool = False
    env: Environment | None = None  # the environment it runs in (held until it ends)
    scattered: list = field(default_factory=list)  # (id, buffers) of scattered values it reads


class Provider(Reporting):
    """A volunteer's provider: ``cpus`` task slots, each a sandboxed worker process.

    Nothing a task does (its output, its channel, its result) and nothing an assignment says can
    end this process or its connection: each assignment is handled inside its own error boundary
    and answered with a result, whatever happens.
    """

    def __init__(self, url: str | None = None, *, name: str | None = None,
                 cpus: int | None = None, memory: int | None = None, gpus: int = 0,
                 price_cpu: float = 0.0, price_memory: float = 0.0, price_gpu: float = 0.0,
                 allow: Sequence[str] = (), home: str | os.PathLike | None = None,
                 reconnect: bool = True, dask_scheduler: str | None = None,
                 output_limit: int = OUTPUT_LIMIT,
                 environments: Environments | None = None,
                 store_memory: int | None = None) -> None:
        self.url = url or os.environ.get("DECOMPUTE_GATEWAY") or DEFAULT_URL
        self.home = decompute_home() if home is None else home
        self.identity = Identity.load_or_create(self.home)
        self.cpus = cpus or os.cpu_count() or 1
        self.memory = memory or psutil.virtual_memory().total
        self.isolation = probe_isolation()
        #: Front this Dask cluster (``provider.dask_backend``) instead of local task processes.
        self.dask_scheduler = dask_scheduler
        #: Output bytes kept per task; the rest is dropped and the drop marked in the output.
        self.output_limit = output_limit
        #: Environments built for tasks' packages (``--install-packages``), or None.
        self.environments = environments
        self.ad = p.ProviderAd(
            name=name or default_name(self.identity.account), cpus=self.cpus,
            memory=self.memory, gpus=gpus, runtime=local_runtime(),
            prices={"cpu": price_cpu, "memory": price_memory, "gpu": price_gpu},
            sandbox="weak" if dask_scheduler else self.isolation.strength,
            allow=list(allow), slots=self.cpus,
            packages=advertised_packages(), installs=environments is not None,
        )
        self.reconnect = reconnect
        self.id: str | None = None
        self.connected = threading.Event()
        self.max_message = GATEWAY_MAX_MESSAGE
        # This session (since this object started serving); lifetime figures are the gateway's
        # (earnings) and provider.stats' (tasks served).
        self.served = 0
        self.cpu_seconds = 0.0  # CPU its tasks used, as metered
        self.tokens = 0.0  # what its tasks were worth at its prices, before the gateway's fee
        self._saved = (0, 0.0)  # served and CPU-s already added to the lifetime stats
        self._earnings = 0.0
        self._earnings_at_start: float | None = None
        self._earnings_heard: asyncio.Event | None = None
        self._funcs: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, asyncio.Task] = {}  # every task held: queued or running
        self._outputs: dict[str, TaskOutput] = {}
        self._output_due: set[str] = set()
        self._load_prev: dict[str, tuple[float, float]] = {}
        store_bytes = store_memory or int(self.memory * STORE_FRACTION)
        self.store = ResultStore(store_bytes, on_evict=self._evicted,
                                 spares=Spares(store_bytes // SPARE_SHARE))
        self.blob_io = BlobIO(self.store, self._send, self._drained)
        self._cancelled: set[str] = set()
        self._handing_back = False
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
        self._earnings_heard = asyncio.Event()
        if self.dask_scheduler:
            log.warning("provider %s: %s", self.ad.name, SANDBOX_NOTE)
            self._pool = DaskBackend(self.dask_scheduler, slots=self.cpus)
        else:
            loud = log.info if self.isolation.strength == "strong" else log.warning
            loud("provider %s: %s", self.ad.name, describe(self.isolation))
            per_worker = self.memory // self.cpus
            self._pool = WorkerPool(
                self.cpus, Limits(memory_bytes=per_worker), self.isolation, hide_paths=[self.home],
                readonly_paths=[self.environments.root] if self.environments else [])
        if isinstance(self._pool, WorkerPool):
            self._pool.max_frame = max(self._pool.max_frame, (self.store.limit or 0) + 2**20)
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
            self._save_stats()
            await self._pool.close()
            self.store.close()

    async def _session(self) -> None:
        """One connection: handshake, then read assignments until it closes or we stop."""
        async with connect(self.url, compression=None, max_size=MAX_MESSAGE,
                           ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT) as ws:
            welcome = await handshake(ws, self.identity, "provider", ad=self.ad,
                                      name=self.ad.name)
            self.id = welcome.session
            self.max_message = welcome.max_message or GATEWAY_MAX_MESSAGE
            self._writer = FrameWriter(ws)
            self._writer.send(p.encode(p.Query(id=EARNINGS_QUERY, what="earnings")))
            log.info("provider %s connected to %s as %s", self.ad.name, self.url, self.id)
            self.connected.set()
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._writer.run()),
                             tg.create_task(self._heartbeats())]
                    stopper = tg.create_task(self._stop.wait())
                    reader = tg.create_task(self._read(ws, tg))
                    await asyncio.wait({stopper, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if self._stop.is_set() and not reader.done():
                        await self._hand_back(ws)
                    for t in [*tasks, stopper, reader, *self._running.values()]:
                        t.cancel()
            finally:
                self.connected.clear()
                self._writer = None
                self.blob_io.reset()
                self._running.clear()
                self._handing_back = False

    async def _hand_back(self, ws) -> None:
        """A graceful stop: report the usage of what runs (so it is paid), kill it, hear the
        last earnings, send what is queued, then close; the gateway re-queues the tasks."""
        assert self._writer is not None and self._earnings_heard is not None
        self._handing_back = True
        held = list(self._running)
        log.info("provider %s stopping: handing %d tasks back to the gateway", self.ad.name,
                 len(held))
        self._send_heartbeat()
        running = list(self._running.values())
        for t in running:
            t.cancel()
        self._earnings_heard.clear()
        self._writer.send(p.encode(p.Query(id=EARNINGS_QUERY, what="earnings")))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HAND_BACK_SECONDS):
                if running:
                    await asyncio.wait(running)
                await self._earnings_heard.wait()
                while self._writer.queue:
                    await asyncio.sleep(0.01)  # FrameWriter has no drained event; bounded
        await ws.close(1001, f"provider stopping; {len(held)} tasks handed back")

    async def _read(self, ws, tg: asyncio.TaskGroup) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                try:
                    msg, buffers = p.decode(data, allowed=ACCEPTED)
                except p.ProtocolError as exc:
                    self._unreadable(data, exc, tg)
                    continue
                try:
                    self._dispatch(msg, buffers, tg)
                except Exception:  # one message must never end the connection
                    log.exception("provider %s: could not handle a %s message", self.ad.name,
                                  msg.TYPE)

    def _send(self, frame: p.Frame) -> None:
        if self._writer is not None:
            self._writer.send(frame)

    async def _drained(self, limit: int) -> None:
        if self._writer is not None:
            await self._writer.drained(limit)

    def _evicted(self, keys: list[str]) -> None:
        """The store made room: the gateway must not count on these keys here any more."""
        self._send(p.encode(p.Evicted(blobs=keys)))

    def _dispatch(self, msg: p.Message, buffers: list[memoryview], tg: asyncio.TaskGroup) -> None:
        if self.blob_io.handle(msg, buffers, tg):
            return
        if isinstance(msg, p.Assign):
            if not self._handing_back:  # what we do not take is re-queued when we close
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

    def _unreadable(self, data: bytes, exc: p.ProtocolError, tg: asyncio.TaskGroup) -> None:
        """A frame we cannot decode: run what is sound in it, refuse by name what is not, tell
        the gateway, and stay connected."""
        refused, unnamed, kind = salvage_assign(data, self, tg)
        log.error("provider %s: unreadable %s frame from the gateway: %s (%d tasks refused, %d "
                  "unnamed)", self.ad.name, kind, exc, len(refused), unnamed)
        for key, why in refused.items():
            self._results.append((refusal(key, clip(
                f"the provider could not read this task's assignment: {why}", 2000),
                p.ErrorCode.SCHEMA.value), []))
        self._schedule_flush()
        if self._writer is not None:
            self._writer.send(p.encode(p.Error(
                code=exc.code.value, keys=list(refused)[:1000],
                message=clip(f"provider {self.ad.name} could not read a {kind} message: {exc}"
                             + (f"; {unnamed} tasks in it have no usable key" if unnamed
                                else ""), 2000))))

    def _send_data(self, keys: Sequence[str]) -> None:
        """Answer a fetch with the kept results we hold (and name the ones we do not)."""
        found = [(k, self.store.get(k)) for k in keys]
        have = [(k, bufs) for k, bufs in found if bufs is not None]
        missing = [k for k, bufs in found if bufs is None]
        if self._writer is not None:
            for frame in data_frames(have, missing, self.max_message):
                self._writer.send(frame)

    def _cancel(self, keys: Sequence[str]) -> None:
        """Every cancelled key gets a ``cancelled`` result: running ones once killed, queued
        ones at once (through their task), unknown ones right here."""
        for key in keys:
            if key in self._running:
                self._cancelled.add(key)
                self._running[key].cancel()
            else:
                self._results.append((p.Result(key=key, status="cancelled", code="cancelled"), []))
                self._schedule_flush()

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
        """Stop serving: running tasks are handed back (reported, killed; the gateway re-queues
        them), workers end."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request_stop(self) -> None:
        """From this provider's own loop (a signal handler): begin the graceful stop."""
        if self._stop is not None:
            self._stop.set()

    def kill_now(self) -> None:
        """Kill every task process at once (the second Ctrl-C); the caller then exits."""
        for worker in list(self._pool.workers if self._pool is not None else []):
            pid = getattr(worker, "pid", None)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ tasks

    def _accept(self, msg: p.Assign, buffers: list[memoryview], tg: asyncio.TaskGroup) -> None:
        for func_hash, blob in zip(msg.funcs, buffers[: len(msg.funcs)], strict=True):
            self._funcs[func_hash] = bytes(blob)
            if len(self._funcs) > FUNC_BLOBS_KEPT:
                self._funcs.popitem(last=False)
        payloads = p.split_buffers([t.nb for t in msg.tasks], buffers[len(msg.funcs):])
        for spec, payload in zip(msg.tasks, payloads, strict=True):
            self.take(spec, payload, tg)

    def take(self, a: p.Assignment, payload: list[memoryview], tg: asyncio.TaskGroup) -> None:
        """Start one assignment, or answer it with a refusal if this provider cannot run it."""
        if a.key in self._running:
            log.warning("provider %s: task %s assigned again while held; the first run answers",
                        self.ad.name, a.key)
            return
        why = self._refusal(a)
        if why is not None:
            log.warning("provider %s: refused task %s: %s", self.ad.name, a.key, why)
            self._finish(a, refusal(a.key, why))
            return
        task = tg.create_task(self._execute(a, payload))
        self._running[a.key] = task
        task.add_done_callback(lambda t, a=a: self._cancelled_unstarted(a, t))

    def _cancelled_unstarted(self, a: p.Assignment, task: asyncio.Task) -> None:
        """A task cancelled before its first step never enters ``_execute`` (asyncio throws
        the cancellation into the unstarted coroutine), so nothing there reports it: answer its
        cancel here, as the gateway's slot accounting needs every cancelled key confirmed."""
        if self._running.get(a.key) is not task:
            return  # _execute ran and reported (or a new assignment of the key took over)
        self._running.pop(a.key, None)
        if a.key in self._cancelled:
            self._cancelled.discard(a.key)
            self._finish(a, p.Result(key=a.key, status="cancelled", code="cancelled"))

    def _refusal(self, a: p.Assignment) -> str | None:
        """Why this provider cannot run ``a``, or None."""
        if a.func not in self._funcs:
            return (f"function {a.func} was never sent to this provider (or was evicted from "
                    f"its cache of {FUNC_BLOBS_KEPT}); the gateway should resend it")
        if a.items and self.dask_scheduler:
            return (f"provider {self.ad.name} fronts a Dask cluster, which runs no chunks of a "
                    f"map; submit with chunksize=1 or choose another provider")
        for name, offered in (("cpus", self.cpus), ("memory", self.memory),
                              ("gpus", self.ad.gpus)):
            asked = a.resources.get(name, 0) or 0
            if asked > offered:
                return (f"the task asks for {name}={asked:g}; provider {self.ad.name} offers "
                        f"{offered:g}")
        return None

    async def _execute(self, a: p.Assignment, payload: list[memoryview]) -> None:
        """Run one assignment and report it: its own error boundary. Cancellation at any point
        (waiting for inputs or a worker, or running) is reported as ``cancelled`` when the
        gateway asked for it; any failure of ours becomes this task's error, nothing more."""
        slot = _Slot()
        pinned = self.blob_io.pin_refs(a) if a.refs else []
        try:
            if a.refs:  # wait (without a worker) for the blobs the gateway is sending
                payload, slot.scattered = await self.blob_io.inputs(a, payload)
            outcome = await self._run(a, payload, slot)
            self._finish(a, *self._result(a, outcome), dropped=outcome.dropped)
            slot.reported = True
        except asyncio.CancelledError:
            usage = await self._stop_worker(slot)
            if a.key not in self._cancelled:
                raise  # we are shutting down, not cancelling one task
            self._finish(a, p.Result(key=a.key, status="cancelled", code="cancelled",
                                     usage=usage))
            slot.reported = True
        except Exception as exc:
            log.exception("provider %s: task %s failed inside the provider", self.ad.name, a.key)
            usage = await self._stop_worker(slot)
            self._finish(a, failure(a.key, "RuntimeError", "builtins", clip(
                f"the provider failed while handling this task ({type(exc).__name__}: {exc}); "
                f"it keeps serving, retry the task", 2000), p.ErrorCode.INTERNAL.value, usage))
            slot.reported = True
        finally:
            if slot.env is not None and self.environments is not None:
                self.environments.release(slot.env)
            self._cancelled.discard(a.key)
            self._running.pop(a.key, None)
            self._outputs.pop(a.key, None)
            self._output_due.discard(a.key)
            try:
                if slot.worker is not None:
                    self.served += slot.reported  # a task handed back was not served
                    if not (self._handing_back and slot.broken):  # stopping: no replacement
                        await asyncio.shield(self._pool.release(slot.worker, broken=slot.broken))
            finally:  # after the release killed what the task left running: see spares
                for key in pinned:
                    self.store.unpin(key)

    async def _run(self, a: p.Assignment, payload: list[memoryview], slot: _Slot) -> Outcome:
        assert self._pool is not None
        blob = self._funcs.get(a.func)
        if blob is None:
            return Outcome("error", code=p.ErrorCode.INTERNAL.value, error={
                "type": "RuntimeError", "module": "builtins", "traceback": "",
                "message": f"function {a.func} was never sent to this provider"})
        deps = None
        if a.deps is not None:  # a graph task: wait (without a worker) for its inputs
            deps = [(d, await self.store.wait(d)) for d in a.deps]
        python = None
        if a.packages and self.environments is not None and self.environments.needed(a.packages):
            try:  # a build delays only the tasks that need it; one build per requirement set
                slot.env = await self.environments.hold(a.packages)
            except EnvironmentBuildError as exc:
                return Outcome("error", code="environment", error=exc.as_error())
            python = slot.env.python
        slot.worker = worker = await self._pool.acquire(
            a.account, **({"python": python} if python else {}))
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
                    gpus=min(a.resources.get("gpus", 0), self.ad.gpus),
                    output_limit=self.output_limit,
                    **({"parts": a.parts} if a.items else {}),
                    **({"scattered": slot.scattered} if slot.scattered else {}))
        except TimeoutError:
            usage = await self._stop_worker(slot)
            outcome = Outcome("error", code="timeout", usage=usage, error={
                "type": "TimeoutError", "module": "builtins", "traceback": "",
                "message": f"task {a.key.split('/')[-1]} exceeded its timeout of "
                           f"{a.timeout:g} s; its process was killed"})
        finally:
            started.cancel()
        slot.broken = slot.broken or outcome.code == "worker_died"
        return outcome

    async def _stop_worker(self, slot: _Slot) -> dict[str, float]:
        """Kill the slot's worker (it is replaced on release); its usage until now."""
        worker = slot.worker
        if worker is None or slot.broken:
            return {}
        slot.broken = True
        meter = getattr(worker, "meter", None)
        usage = meter.sample() if meter is not None else {}
        await asyncio.shield(self._pool.kill(worker))
        return usage

    def _result(self, a: p.Assignment, outcome: Outcome) -> tuple[p.Result, list[memoryview]]:
        """The report of a task; a kept result stays in the store and is sent only if asked."""
        error = p.RemoteFailure.from_wire(outcome.error) if outcome.error else None
        buffers, stored, nbytes, refs = outcome.buffers, False, 0, []
        if a.blobs and outcome.status == "finished" and not outcome.parts:
            buffers, refs = self.blob_io.leave_results(a.account, buffers)
        if outcome.status == "finished" and (a.send or not a.keep):
            too_big = result_too_big(buffers, self.max_message)
            if too_big is not None:  # the task's own error: the user catches a ValueError
                error = p.RemoteFailure(type="ValueError", module="builtins", message=too_big)
                return p.Result(key=a.key, status="error", usage=outcome.usage, error=error), []
        if outcome.parts:  # a chunk: one outcome per item, never kept here
            return p.Result(key=a.key, status="finished", nb=len(buffers), code=outcome.code,
                            usage=outcome.usage, parts=outcome.parts, failed=outcome.failed,
                            errors=[p.RemoteFailure.from_wire(e) for e in outcome.errors]
                            ), buffers
        if a.keep and outcome.status == "finished":
            try:
                self.store.put(a.key, buffers)
            except StoreFull as exc:
                error = p.RemoteFailure(type="MemoryError", module="builtins", message=str(exc))
                return p.Result(key=a.key, status="error", usage=outcome.usage, error=error), []
            stored, nbytes = True, sum(b.nbytes for b in buffers)
            buffers = buffers if a.send else []
        return p.Result(key=a.key, status=outcome.status, nb=len(buffers), error=error,
                        code=outcome.code, usage=outcome.usage, stored=stored,
                        nbytes=nbytes, refs=refs), buffers
