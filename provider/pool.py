"""A warm pool of sandboxed task processes, each bound to one client account at a time.

Workers are started before work arrives, so a trivial task costs no process start. A worker that
ran a task for account A only ever runs tasks of A again; a task of another account gets a fresh
process, so no client can leave something behind for the next. To keep that cheap when accounts
interleave (a sandboxed worker takes a few hundred ms of CPU to start: unshare, mounts, Python and
its preload), the pool keeps up to ``keep`` workers: the ``size`` slots, a spare unbound worker
started in the background whenever the spare is taken, and idle workers still bound to the
accounts they served, so an account's next task finds its own warm process. Past ``keep`` the
least recently used idle worker is killed (in the background) to make room. A worker that was
killed (cancel, timeout, a limit) is replaced at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil

from gateway.protocol import MAX_BUFFERS, MAX_ITEMS, frame_parts
from provider.channel import (
    MAX_FRAME_BYTES,
    ChannelClosed,
    ChannelError,
    Done,
    Failed,
    parse_reply,
    read_frame,
    sanitize_error,
    send_frame,
)
from provider.metering import Meter, process_cpu
from provider.sandbox import (
    Isolation,
    Limits,
    SandboxSpec,
    cleanup,
    kill_cgroup,
    sandbox_spec,
    strays,
    worker_pid,
)
from provider.scattered import note_use
from provider.shared_memory import split_shared
from provider.worker import CHUNK_ERROR_CHARS, FUNCS_KEPT

log = logging.getLogger(__name__)

#: Seconds a new worker has to import its runtime and say it is ready.
START_TIMEOUT = 60.0

#: Idle workers kept bound to their accounts (besides the slots and the spare), at least: as many
#: tasks as the gateway hands a provider beyond its slots (its prefetch, gateway.registry), so the
#: accounts of the tasks in hand each find a warm worker of their own (~25 MB each, idle).
KEEP_IDLE_MIN = 8

OnOutput = Callable[[str, str], None]


@dataclass(slots=True)
class Outcome:
    """How a task ended on a worker: ``finished`` with result buffers, or ``error``."""

    status: str
    buffers: list[memoryview] = field(default_factory=list)
    error: dict | None = None
    code: str | None = None
    usage: dict[str, float] = field(default_factory=dict)
    dropped: int = 0  # output bytes the worker dropped over its cap (shown in the output)
    #: A chunk's per-item outcomes: result buffer counts, the items that raised, their errors.
    parts: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class WorkerProc:
    """One sandboxed worker process and its channel."""

    proc: asyncio.subprocess.Process
    sock: socket.socket
    spec: SandboxSpec
    ps: psutil.Process
    account: str | None = None
    busy: bool = False
    meter: Meter | None = None
    task_key: str | None = None
    last_used: float = 0.0
    funcs_sent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: Scattered values the worker caches (a mirror of its LRU, ``provider.scattered``).
    scattered: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: The interpreter of a task environment it runs (``provider.environments``); None: the
    #: provider's own. Only tasks needing that same environment reuse it.
    python: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def needs_func(self, func_hash: str) -> bool:
        """True (and remembered) the first time; we remember half of what the worker keeps."""
        if func_hash in self.funcs_sent:
            return False
        self.funcs_sent[func_hash] = None
        if len(self.funcs_sent) > FUNCS_KEPT // 2:
            self.funcs_sent.popitem(last=False)
        return True


async def _read_frame(sock: socket.socket) -> tuple[dict, list[memoryview]]:
    """One frame from a worker, bounded and checked (:func:`provider.channel.read_frame`); a
    closed channel reads as an incomplete read, as a worker that never started does."""
    try:
        return await read_frame(sock)
    except ChannelClosed as exc:
        raise asyncio.IncompleteReadError(b"", None) from exc


def exit_description(code: int | None) -> str:
    """Why a worker process ended, in words a user can act on."""
    if code is None:
        return "the task process ended"
    if code < 0:
        sig = signal.Signals(-code)
        hint = {
            signal.SIGXCPU: " (it reached its CPU-time limit)",
            signal.SIGKILL: " (killed: a limit, or the provider's memory guard)",
            signal.SIGXFSZ: " (it reached its file-size limit)",
            signal.SIGSEGV: " (a crash in native code)",
        }.get(sig, "")
        return f"the task process was ended by {sig.name}{hint}"
    return f"the task process exited with code {code}"


def chunk_outcome(worker: WorkerProc, done: Done, items: int) -> Outcome:
    """A chunk's ``done``: its manifest checked against the chunk (as a frame from the task
    process is: anything malformed is the task's channel breaking, and ends its worker)."""
    assert worker.meter is not None
    usage = worker.meter.sample()
    try:
        parts, failed, errors = _manifest(done.buffers, items)
    except (ChannelError, ValueError, TypeError) as exc:
        return WorkerPool._broken(worker, f"the task broke its channel to the provider: {exc}; "
                                          f"its process was killed")
    return Outcome("finished", done.buffers[1:], usage=usage, dropped=done.dropped,
                   parts=parts, failed=failed, errors=errors)


def _manifest(buffers: list[memoryview], items: int) -> tuple[list[int], list[int], list[dict]]:
    """``(parts, failed, errors)`` of a chunk's ``done``, or ChannelError saying what is wrong."""
    if not buffers:
        raise ChannelError("a chunk's result came without its manifest")
    data = msgpack.unpackb(buffers[0], raw=False, strict_map_key=True,
                           max_array_len=MAX_ITEMS, max_map_len=8)
    if not isinstance(data, dict):
        raise ChannelError("a chunk's manifest is not a map")
    parts, failed, errors = data.get("parts"), data.get("failed"), data.get("errors")
    if not (isinstance(parts, list) and len(parts) == items
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in parts)
            and sum(parts) == len(buffers) - 1 and len(buffers) - 1 <= MAX_BUFFERS):
        raise ChannelError(f"a chunk's manifest does not describe its {items} items' buffers")
    if not (isinstance(failed, list) and isinstance(errors, list)
            and len(failed) == len(errors) and failed == sorted(set(failed))
            and all(isinstance(i, int) and 0 <= i < items and not parts[i] for i in failed)):
        raise ChannelError("a chunk's manifest names its failed items wrongly")
    room = CHUNK_ERROR_CHARS // max(1, 2 * len(errors))  # a result header stays small
    errors = [sanitize_error(e) for e in errors]
    for e in errors:
        e["message"], e["traceback"] = e["message"][:room], e["traceback"][-room:]
    return parts, failed, errors


class WorkerPool:
    """``size`` warm workers; :meth:`acquire` one for an account, :meth:`release` it after."""

    def __init__(self, size: int, limits: Limits, isolation: Isolation,
                 hide_paths: Sequence[Path] = (), spares: int = 1, keep: int | None = None,
                 readonly_paths: Sequence[Path] = ()) -> None:
        self.size = size
        self.spares = spares
        #: Workers kept at most (slots, spares and idle ones bound to their accounts).
        self.keep = keep if keep is not None else size + spares + max(size, KEEP_IDLE_MIN)
        self._slots = asyncio.Semaphore(size)  # tasks running at once
        self.limits = limits
        #: Largest message a task may send back: a result bigger than the largest gateway
        #: message may still fit the store (and travel as a blob), up to its bound.
        self.max_frame = MAX_FRAME_BYTES
        self.isolation = isolation
        self.hide_paths = list(hide_paths)
        self.readonly_paths = list(readonly_paths)  # task environments: importable, not writable
        self.workers: list[WorkerProc] = []
        self._starting = 0  # workers being started (counted against ``keep``)
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Future] = set()
        self.spawned = 0  # workers started over the pool's life (for tests and measurements)

    async def start(self) -> None:
        count = self.size + self.spares
        self.workers = list(await asyncio.gather(*(self._spawn() for _ in range(count))))

    async def _spawn(self, python: str | None = None) -> WorkerProc:
        self.spawned += 1
        parent, child = socket.socketpair()
        program = [python or sys.executable, "-m", "provider.worker", str(child.fileno())]
        spec = sandbox_spec(program, limits=self.limits, isolation=self.isolation,
                            hide_paths=self.hide_paths, readonly_paths=self.readonly_paths)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                pass_fds=(child.fileno(),), start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=None,
            )
        except BaseException:
            parent.close()
            cleanup(spec)
            raise
        finally:
            child.close()
        parent.setblocking(False)
        worker = WorkerProc(proc, parent, spec, psutil.Process(proc.pid), python=python)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                header, _ = await _read_frame(parent)
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            await self._kill(worker)
            raise RuntimeError(f"task process failed to start: {exit_description(proc.returncode)}"
                               ) from exc
        except BaseException:
            await asyncio.shield(self._kill(worker))
            raise
        if header.get("t") != "ready":
            await self._kill(worker)
            raise RuntimeError(f"task process said {header.get('t')!r} instead of ready")
        worker.ps = psutil.Process(worker_pid(spec, proc.pid))  # below unshare --fork, if any
        return worker

    async def acquire(self, account: str, python: str | None = None) -> WorkerProc:
        """An idle worker for ``account``: its own, else the spare, else a fresh one. With
        ``python`` (a task environment's interpreter), only a worker of that environment.

        Waits for a free slot first; :meth:`release` gives the slot back.
        """
        await self._slots.acquire()
        try:
            worker = await self._take(account, python)
        except BaseException:
            self._slots.release()
            raise
        self._refill_spare()
        return worker

    def _total(self) -> int:
        return len(self.workers) + self._starting

    def _lru_idle(self) -> WorkerProc | None:
        """The least recently used idle worker bound to an account (the one to give up)."""
        idle = [w for w in self.workers if not w.busy and w.account is not None]
        return min(idle, key=lambda w: w.last_used) if idle else None

    async def _take(self, account: str, python: str | None = None) -> WorkerProc:
        async with self._changed:
            def ready() -> bool:
                return self._total() < self.keep or any(not w.busy for w in self.workers)
            await self._changed.wait_for(ready)
            idle = [w for w in self.workers if not w.busy]
            worker = next((w for w in idle if w.account == account and w.python == python), None)
            if python is None:  # spares run the provider's own interpreter
                worker = worker or next((w for w in idle if w.account is None), None)
            if worker is not None:
                worker.busy = True
                worker.account = account
                return worker
            # Only other accounts' workers are idle (never share one): start a fresh one, giving
            # up the least recently used idle one if the pool is full.
            if self._total() >= self.keep and (victim := self._lru_idle()) is not None:
                self._retire(victim)
            self._starting += 1
        starting = asyncio.ensure_future(self._spawn(python))
        self._background.add(starting)  # close() ends it too
        starting.add_done_callback(self._background.discard)
        try:
            worker = await asyncio.shield(starting)
        except asyncio.CancelledError:  # the fresh worker is clean: it becomes a spare
            starting.add_done_callback(self._adopt)
            raise
        except BaseException:
            self._starting -= 1
            self._background_task(self._notify())
            raise
        worker.busy = True
        worker.account = account
        self.workers.append(worker)
        self._starting -= 1
        return worker

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _retire(self, victim: WorkerProc) -> None:
        """Take an idle worker out of service and kill it off the critical path."""
        victim.busy = True
        self._background_task(self._kill_and_drop(victim))

    async def _kill_and_drop(self, victim: WorkerProc) -> None:
        await self._kill(victim)
        async with self._changed:
            if victim in self.workers:
                self.workers.remove(victim)
            self._changed.notify_all()

    def _refill_spare(self) -> None:
        """No unbound worker left or coming: start one in the background, so the next account's
        task finds a fresh process waiting; past ``keep``, the least recently used idle worker
        makes room for it."""
        if self._starting or any(not w.busy and w.account is None for w in self.workers):
            return
        if self._total() >= self.keep:
            victim = self._lru_idle()
            if victim is None:
                return  # all busy: the next acquire refills
            self._retire(victim)
        self._starting += 1
        self._background_task(self._add_spare())

    async def _add_spare(self) -> None:
        try:
            self.workers.append(await self._spawn())
        except Exception:
            log.exception("could not start a spare task process")
        finally:
            self._starting -= 1
        await self._notify()

    async def settled(self) -> None:
        """Wait until the spares being started and the workers being retired are done."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _adopt(self, starting: asyncio.Future) -> None:
        """A fresh worker whose task was cancelled while it started joins the pool unbound."""
        self._starting -= 1
        if not starting.cancelled() and starting.exception() is None:
            if starting.result().python is not None:  # an environment's: never a spare
                self._background_task(self._kill(starting.result()))
            else:
                self.workers.append(starting.result())
        self._background_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def release(self, worker: WorkerProc, *, broken: bool = False) -> None:
        """Give a worker (and its slot) back; a broken one (killed, crashed) is replaced."""
        try:
            if broken or worker.proc.returncode is not None or self._tainted(worker):
                worker = await self._replace(worker)
            async with self._changed:
                worker.busy = False
                worker.meter = None
                worker.task_key = None
                worker.last_used = time.monotonic()
                self._changed.notify_all()
        finally:
            self._slots.release()

    def _tainted(self, worker: WorkerProc) -> bool:
        """A worker that must not serve again: its task left a process running (all of them die
        with the worker), or it used half its lifetime CPU limit (a task must not hit it)."""
        left = strays(worker.spec, worker.proc.pid, worker.ps.pid)
        if left:
            log.info("task %s left %d processes running; they die with its worker",
                     worker.task_key, len(left))
            return True
        limit = self.limits.cpu_seconds
        with contextlib.suppress(OSError, ValueError, IndexError):
            return limit is not None and process_cpu(worker.ps) > limit / 2
        return True  # gone: replace it

    async def _replace(self, worker: WorkerProc) -> WorkerProc:
        await self._kill(worker)
        fresh = await self._spawn(worker.python)
        fresh.busy = worker.busy
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    async def run(self, worker: WorkerProc, key: str, func: str, func_blob: memoryview | None,
                  payload: Sequence[memoryview], on_output: OnOutput,
                  memory: int | None = None,
                  deps: Sequence[tuple[str, Sequence[bytes]]] | None = None,
                  gpus: float = 0.0, output_limit: int | None = None,
                  parts: Sequence[int] = (),
                  scattered: Sequence[tuple[str, Sequence]] = ()) -> Outcome:
        """Run one task on ``worker``; cancellation of this coroutine is the caller's kill.

        ``deps`` (graph tasks) are ``(key, result buffers)`` pairs handed to the task; ``parts``
        (a chunk's) the argument buffers of each item. Whatever the task does to its channel
        ends here as an ``error`` outcome (code ``worker_died``: the caller replaces the
        worker), never as an exception.
        """
        has_func = func_blob is not None and worker.needs_func(func)
        header = {"t": "run", "key": key, "func": func, "has_func": has_func, "memory": memory,
                  "nb": len(payload), "output_limit": output_limit}
        items = len(parts)
        if items:
            header["parts"] = list(parts)
        parts = [func_blob, *payload] if has_func else list(payload)
        if deps is not None:
            header["deps"] = [k for k, _ in deps]
            header["dep_nbs"] = [len(bufs) for _, bufs in deps]
            parts += [b for _, bufs in deps for b in bufs]
        if scattered:  # each value once per worker: it keeps the last few it loaded
            header["scat"] = []
            for blob_id, bufs in scattered:
                send = note_use(worker.scattered, blob_id)
                header["scat"].append([blob_id, len(bufs) if send else 0])
                parts += list(bufs) if send else []
        parts, shared, fds = split_shared(parts)
        if shared:  # big blobs go as memfd descriptors the worker maps: no copy
            header["fds"] = shared
        frame = frame_parts(header, parts)
        worker.meter = Meter(worker.ps, gpus)
        worker.task_key = key
        try:
            await send_frame(worker.sock, frame, fds)  # one sendmsg; a large part is not copied
            while True:
                reply = parse_reply(*await read_frame(worker.sock, self.max_frame), key)
                if isinstance(reply, Done) and items:
                    return chunk_outcome(worker, reply, items)
                if isinstance(reply, Done):
                    return Outcome("finished", reply.buffers, usage=worker.meter.sample(),
                                   dropped=reply.dropped)
                if isinstance(reply, Failed):
                    return Outcome("error", error=reply.error, usage=worker.meter.sample(),
                                   dropped=reply.dropped)
                on_output(reply.stream, reply.text)
                # A read that finds data never yields: without this, a task flooding its
                # channel would starve heartbeats and the connection until the gateway gives up.
                await asyncio.sleep(0)
        except ChannelClosed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await worker.proc.wait()
            if worker.proc.returncode is None:
                return self._broken(worker, "the task closed its channel to the provider; its "
                                            "process was killed")
            description = exit_description(worker.proc.returncode)
            if worker.proc.returncode >= 0:  # it ended on its own: say what the provider saw
                description += " after its channel to the provider closed"
            return self._broken(worker, description)
        except (ChannelError, OSError) as exc:
            return self._broken(worker, f"the task broke its channel to the provider: {exc}; "
                                        f"its process was killed")

    @staticmethod
    def _broken(worker: WorkerProc, message: str) -> Outcome:
        assert worker.meter is not None
        return Outcome("error", code="worker_died", usage=worker.meter.sample(), error={
            "type": "WorkerDied", "module": "decompute", "message": message, "traceback": ""})

    async def kill(self, worker: WorkerProc) -> None:
        await self._kill(worker)

    async def _kill(self, worker: WorkerProc) -> None:
        """SIGKILL everything the worker started (its cgroup, its process group, its PID namespace
        with it) and remove its working directory."""
        if worker.spec.cgroup is not None:  # setsid() escapes a process group, not a cgroup
            kill_cgroup(worker.spec.cgroup)
        if worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
            await worker.proc.wait()
        worker.sock.close()
        cleanup(worker.spec)

    async def close(self) -> None:
        log.info("worker pool: %d task processes started over its life", self.spawned)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(self._kill(w) for w in self.workers), return_exceptions=True)
        self.workers = []
