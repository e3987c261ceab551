"""A provider's task slots backed by a Dask cluster: ``decompute-provider --dask-scheduler ADDR``.

:class:`DaskBackend` has :class:`provider.pool.WorkerPool`'s interface (``start``, ``acquire``,
``run``, ``release``, ``kill``, ``close``, ``workers``), so the provider runs assignments on it
unchanged. One slot is one thread of the cluster; ``run`` submits :func:`execute_blob` through a
``distributed.Client``, and the task's function blob, arguments and dependency buffers are
unpickled **on the Dask worker**, never in the provider process. The result comes back as pickle
protocol 5 buffers (or a structured error), exactly as a local worker would answer.

What this gives up against the local sandbox (the provider advertises ``sandbox="weak"``):

- no network namespace: tasks can reach whatever the cluster's workers can (the scheduler, the
  other workers, the LAN);
- no per-task uid, private temp dir, hidden paths or rlimits from us: a task runs as the worker's
  user, in a process shared with other tasks and other accounts, with only the cluster's own
  isolation (containers, worker memory limits) around it;
- cancel and timeout cannot kill a running task: Dask cannot interrupt a thread, so the slot is
  freed and the result discarded while the thread finishes on the cluster;
- usage is measured inside the worker (thread CPU time), so a task could under-report it; the
  provider clamps CPU seconds to the wall time it measured itself, so it cannot over-report;
- distributed's own protocol pickles: a task that takes over its worker process can send crafted
  messages to this provider's ``distributed.Client``. Run the cluster for this provider alone.

What it keeps: the gateway still only relays opaque bytes, clients still read results through
their allow-list, and this process never unpickles client payloads itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from provider.pool import Outcome

log = logging.getLogger(__name__)

OnOutput = Callable[[str, str], None]
#: What the provider logs at start, so its operator knows what isolation is left.
SANDBOX_NOTE = ("sandbox: weak; tasks run in the Dask cluster's worker processes with only the "
                "cluster's own isolation: no network namespace, no per-task uid or rlimits, "
                "shared across accounts, and cancel cannot stop a running task")
#: Arguments larger than this are scattered to the cluster, not embedded in the task graph
#: (distributed passes graph-embedded data through its scheduler).
SCATTER_BYTES = 1 << 20


@dataclass(slots=True, eq=False)
class DaskSlot:
    """One task slot (a thread of the cluster); the stand-in for ``WorkerProc``.

    ``meter`` stays None: no local process to meter (usage arrives with each result).
    """

    index: int
    account: str | None = None
    busy: bool = False
    meter: None = None
    task_key: str | None = None
    future: Any = None
    pid: int | None = None  # the Dask worker process that ran this slot's last task


def execute_blob(func_blob: bytes, payload: Sequence[bytes],
                 deps: Sequence[tuple[str, Sequence[bytes]]] | None) -> dict:
    """Runs ON THE DASK WORKER: unpickle the function and arguments there, call, pickle the
    result (protocol 5, out-of-band buffers), or describe the error as data. Never raises."""
    import io
    import os
    import pickle
    import sys
    import threading
    import traceback

    wall0, cpu0 = time.monotonic(), time.thread_time()
    router = sys.stdout if getattr(sys.stdout, "decompute_router", False) else None
    if router is None:  # once per worker process: print() of concurrent tasks stays apart

        class Router(io.TextIOBase):
            decompute_router = True

            def __init__(self, fallback: Any) -> None:
                self.fallback, self.local = fallback, threading.local()

            def writable(self) -> bool:
                return True

            def write(self, text: str) -> int:
                parts = getattr(self.local, "parts", None)
                (parts.append if parts is not None else self.fallback.write)(text)
                return len(text)

        router = sys.stdout = Router(sys.stdout)
    router.local.parts = captured = []
    try:
        fn = cloudpickle.loads(func_blob)
        args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])
        if deps is not None:  # a graph task: its first argument maps dep keys to values
            values = {key.split("/", 1)[-1]: cloudpickle.loads(bufs[0], buffers=bufs[1:])
                      for key, bufs in deps}
            args = (values, *args)
        value = fn(*args, **kwargs)
        oob: list[pickle.PickleBuffer] = []
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=oob.append)
        reply: dict = {"status": "finished", "buffers": [data, *(bytes(b.raw()) for b in oob)]}
    except BaseException as exc:  # noqa: BLE001 - every task failure is reported, not raised
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code is execute_blob.__code__:
            tb = tb.tb_next  # the task's own frames are what the user needs
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        reply = {"status": "error", "error": {
            "type": type(exc).__qualname__, "module": type(exc).__module__,
            "message": str(exc)[:100_000], "traceback": text[-100_000:]}}
    finally:
        router.local.parts = None
    reply["output"] = "".join(captured)
    reply["pid"] = os.getpid()
    reply["cpu_seconds"] = time.thread_time() - cpu0
    reply["wall_seconds"] = time.monotonic() - wall0
    return reply


# Travels by value: the cluster's workers need not have decompute installed.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cluster_runtime() -> tuple[str, str]:
    import platform

    import cloudpickle

    return ".".join(platform.python_version_tuple()[:2]), cloudpickle.__version__


def _totals(workers: dict[str, dict]) -> tuple[int, int]:
    cores = sum(int(w.get("nthreads", 0)) for w in workers.values())
    memory = sum(int(w.get("memory_limit") or 0) for w in workers.values())
    return cores, memory


def dask_cluster_resources(address: str, timeout: float = 30.0) -> tuple[int, int]:
    """``(cores, memory bytes)`` of the cluster at ``address``: what the provider advertises.

    Synchronous (its own event loop thread), for the command line before the provider starts.
    """
    import distributed

    # OSError when nothing answers at ``address`` within ``timeout``
    with distributed.Client(address, timeout=timeout) as client:
        cores, memory = _totals(client.scheduler_info(n_workers=-1)["workers"])
    if cores < 1:
        raise RuntimeError(f"the Dask cluster at {address} has no workers; start some first")
    return cores, memory


class DaskBackend:
    """Task slots on a Dask cluster, with ``WorkerPool``'s async interface."""

    def __init__(self, address: str, slots: int | None = None,
                 connect_timeout: float = 30.0) -> None:
        self.address = address
        self.size = slots
        self.connect_timeout = connect_timeout
        self.client: Any = None
        self.workers: list[DaskSlot] = []
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        """Connect; one slot per cluster thread (or ``slots``); refuse a mismatched runtime."""
        import distributed

        self.client = await distributed.Client(self.address, asynchronous=True,
                                               timeout=self.connect_timeout)
        identity = await self.client.scheduler.identity(n_workers=-1)
        cores, _ = _totals(identity.get("workers", {}))
        if cores < 1:
            await self.client.close()
            raise RuntimeError(f"the Dask cluster at {self.address} has no workers")
        here = _cluster_runtime()
        there = set((await self.client.run(_cluster_runtime)).values())
        if there != {here}:
            await self.client.close()
            raise RuntimeError(f"the Dask cluster's workers run python/cloudpickle {there}, this "
                               f"provider {here}: tasks are matched to the provider's runtime, "
                               "so they must be equal")
        self.workers = [DaskSlot(i) for i in range(self.size or cores)]
        log.info("dask backend: %d slots on %s (%d cluster threads)", len(self.workers),
                 self.address, cores)

    async def acquire(self, account: str) -> DaskSlot:
        """A free slot. Slots share the cluster's processes whatever the account (see above)."""
        async with self._changed:
            await self._changed.wait_for(lambda: any(not w.busy for w in self.workers))
            slot = next(w for w in self.workers if not w.busy)
            slot.busy, slot.account = True, account
            return slot

    async def release(self, worker: DaskSlot, *, broken: bool = False) -> None:
        """Free the slot; ``broken`` means nothing more here (the cluster replaces workers)."""
        async with self._changed:
            worker.busy = False
            worker.task_key = None
            worker.future = None
            self._changed.notify_all()

    async def run(self, worker: DaskSlot, key: str, func: str, func_blob: memoryview | None,
                  payload: Sequence[memoryview], on_output: OnOutput,
                  memory: int | None = None,
                  deps: Sequence[tuple[str, Sequence[bytes]]] | None = None,
                  gpus: float = 0.0, output_limit: int | None = None) -> Outcome:
        """Run one task on the cluster; cancelling this coroutine is the caller's kill.

        ``output_limit`` is enforced by the provider (output arrives through ``on_output``).

        ``memory`` and ``gpus`` are not enforced or metered here: the cluster's worker limits
        apply, and GPU time is not measured (reported as 0).
        """
        import distributed

        if func_blob is None:
            raise ValueError("a Dask backend needs the function blob with every task")
        worker.task_key = key
        wall0 = time.monotonic()
        args = [await self._ship(bytes(func_blob)), await self._ship([bytes(b) for b in payload]),
                None if deps is None else
                await self._ship([(k, [bytes(b) for b in bufs]) for k, bufs in deps])]
        fut = self.client.submit(execute_blob, *args, pure=False, retries=0,
                                 key=f"decompute-{key.rsplit('/', 1)[-1][:64]}-{uuid.uuid4().hex}")
        worker.future = fut
        try:
            reply = await fut
        except distributed.client.FutureCancelledError as exc:
            return self._died(wall0, f"the Dask cluster cancelled the task: {exc}")
        except Exception as exc:  # KilledWorker, a lost scheduler: the task's process is gone
            return self._died(wall0, f"on the Dask cluster: {type(exc).__name__}: {exc}")
        worker.pid = reply.get("pid")
        if reply.get("output"):
            on_output("stdout", reply["output"])
        wall = time.monotonic() - wall0
        usage = {"cpu_seconds": round(min(float(reply.get("cpu_seconds", 0.0)), wall), 6),
                 "wall_seconds": round(wall, 6), "max_rss_bytes": 0.0,
                 "memory_gib_seconds": 0.0, "gpu_seconds": 0.0}
        if reply["status"] == "finished":
            return Outcome("finished", [memoryview(b) for b in reply["buffers"]], usage=usage)
        return Outcome("error", error=reply["error"], usage=usage)

    async def _ship(self, value: Any) -> Any:
        """Large data goes straight to a worker (scatter), not through distributed's scheduler
        inside the task; a scattered list comes back as a list of futures, resolved there."""
        if _size(value) <= SCATTER_BYTES:
            return value
        return await self.client.scatter(value, hash=False)

    @staticmethod
    def _died(wall0: float, message: str) -> Outcome:
        return Outcome("error", code="worker_died",
                       usage={"wall_seconds": round(time.monotonic() - wall0, 6)},
                       error={"type": "WorkerDied", "module": "decompute", "message": message,
                              "traceback": ""})

    async def kill(self, worker: DaskSlot) -> None:
        """Drop the task's future: a queued task never starts; a running thread cannot be
        stopped by Dask, so it finishes on the cluster and its result is discarded."""
        if worker.future is not None:
            with contextlib.suppress(Exception):
                await worker.future.cancel()

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
        self.workers = []


def _size(obj: Any) -> int:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, (list, tuple)):
        return sum(_size(o) for o in obj)
    return 0

