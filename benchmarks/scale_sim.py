"""Light simulated providers and clients for ``benchmarks/scale.py``: many connections, one process.

Each simulated peer speaks the real wire protocol over its own websocket (the challenge answered
with its own Ed25519 identity, then ``ProviderAd`` / ``Submit`` / ``Results`` / ``Heartbeat``
frames built with :mod:`gateway.protocol`), but does no work: a provider answers every ``Assign``
at once with one ``Results`` frame of finished results, a client submits tiny tasks whose payload
is an opaque buffer (the gateway never unpickles it) and times each one from submit to result.
So the gateway is the only thing in the loop that does real work, and its CPU per task can be
compared at 10, 100 or 1,000 providers.

Why not ``tests/fakes.py``: its ``FakeProvider`` runs a thread and an event loop per connection
and queues every message for a test to inspect (1,000 threads here), and benchmarks must not
depend on the test tree (pytest, fixtures). This module only imports the product's protocol.

Driven by ``scale.py`` over stdin/stdout, one JSON object a line each way::

    python benchmarks/scale_sim.py providers URL [--price-cpu P]
        {"cmd": "add", "n": 90}    -> {"online": 100}
        {"cmd": "close", "n": 90}  -> {"online": 10}
    python benchmarks/scale_sim.py clients URL --clients 100
        {"cmd": "run", "tasks": 30000, "window": 20, "batch": 10}
            -> {"done": ..., "errors": ..., "elapsed_s": ..., "latencies_ms": {...}}
    {"cmd": "quit"} ends either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import platform
import resource
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cloudpickle  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from gateway import protocol as p  # noqa: E402
from gateway.identity import Identity  # noqa: E402
from gateway.transport import PING_INTERVAL, PING_TIMEOUT, handshake  # noqa: E402

log = logging.getLogger("scale_sim")

#: What the simulated peers run on: the same for both sides, so every task fits every provider.
RUNTIME = p.Runtime(python=".".join(platform.python_version_tuple()[:2]),
                    cloudpickle=cloudpickle.__version__)
#: A provider's heartbeat period and its earnings query every few beats, as ``provider.py`` does
#: while it holds no task (these answer at once, so they hold none between heartbeats).
HEARTBEAT_SECONDS = 5.0
EARNINGS_EVERY = 1
#: Handshakes in flight at once: 1,000 simultaneous ones would only queue in the gateway's accept.
CONNECT_AT_ONCE = 64
#: The usage a simulated task reports (a tiny task: half a CPU-millisecond).
USAGE = {"cpu_seconds": 0.0005, "wall_seconds": 0.001}
RESULT_BYTES = b"\x80\x05N."  # pickle of None: opaque to the gateway, never unpickled here
FUNC_BLOB = b"opaque function blob: the gateway only forwards it" * 4
FUNC_HASH = hashlib.sha256(FUNC_BLOB).hexdigest()
PAYLOAD = b"\x80\x05K\x01\x85."  # a pickled (1,): opaque, as any task's arguments


def raise_open_files_limit() -> int:
    """Every connection is a file descriptor: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def open_ws(url: str) -> ClientConnection:
    return await connect(url, compression=None, max_size=2**31, ping_interval=PING_INTERVAL,
                         ping_timeout=PING_TIMEOUT, open_timeout=60)


# --------------------------------------------------------------------------- providers


class SimProvider:
    """One provider connection that finishes every task the moment it is assigned."""

    def __init__(self, url: str, name: str, price_cpu: float) -> None:
        self.url = url
        self.identity = Identity.generate()
        prices = {"cpu": price_cpu} if price_cpu else {}
        self.ad = p.ProviderAd(name=name, cpus=1, memory=2**30, runtime=RUNTIME, prices=prices,
                               sandbox="strong", slots=1)
        self.ws: ClientConnection | None = None
        self.served = 0
        self.task: asyncio.Task | None = None

    async def connect(self) -> None:
        self.ws = await open_ws(self.url)
        await handshake(self.ws, self.identity, "provider", ad=self.ad, name=self.ad.name,
                        timeout=60)

    async def serve(self) -> None:
        """Answer assignments and send heartbeats until the connection closes."""
        assert self.ws is not None
        beats = asyncio.create_task(self._heartbeats())
        try:
            async for data in self.ws:
                if isinstance(data, bytes):
                    await self._receive(data)
        except Exception as exc:  # a dropped connection ends this peer only
            log.debug("provider %s: %r", self.ad.name, exc)
        finally:
            beats.cancel()

    async def _receive(self, data: bytes) -> None:
        assert self.ws is not None
        header, _ = p.decode_frame(data)
        if header.get("t") != "assign":  # replies to earnings queries, errors: nothing to do
            return
        tasks = header.get("tasks", [])
        results = [p.Result(key=t["key"], status="finished", nb=1, usage=USAGE) for t in tasks]
        self.served += len(results)
        await self.ws.send(p.encode(p.Results(results=results), [RESULT_BYTES] * len(results)))

    async def _heartbeats(self) -> None:
        assert self.ws is not None
        beat = p.encode(p.Heartbeat(load={"cpu": 0.0, "memory_bytes": 0.0, "running": 0.0},
                                    usage={}))
        query = p.encode(p.Query(id=1, what="earnings"))
        await asyncio.sleep(HEARTBEAT_SECONDS * secrets.randbelow(1000) / 1000)  # spread them
        n = 0
        with contextlib.suppress(Exception):
            while True:
                await self.ws.send(beat)
                if n % EARNINGS_EVERY == 0:
                    await self.ws.send(query)
                n += 1
                await asyncio.sleep(HEARTBEAT_SECONDS)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class ProviderFleet:
    """The simulated providers of this process, grown and shrunk on command."""

    def __init__(self, url: str, price_cpu: float) -> None:
        self.url = url
        self.price_cpu = price_cpu
        self.live: list[SimProvider] = []
        self.made = 0
        self.tg = asyncio.TaskGroup()

    async def add(self, n: int) -> None:
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)
        new = [SimProvider(self.url, f"sim-{self.made + i}", self.price_cpu) for i in range(n)]
        self.made += n

        async def one(sim: SimProvider) -> None:
            async with gate:
                await sim.connect()
            sim.task = self.tg.create_task(sim.serve())

        await asyncio.gather(*(one(sim) for sim in new))
        self.live += new

    async def close(self, n: int) -> None:
        n = min(n, len(self.live))
        gone, self.live = self.live[len(self.live) - n:], self.live[:len(self.live) - n]
        await asyncio.gather(*(sim.close() for sim in gone))

    def status(self) -> dict[str, Any]:
        return {"online": len(self.live), "served": sum(s.served for s in self.live)}


# --------------------------------------------------------------------------- clients


class SimClient:
    """One client connection: submits tiny tasks in batches, keeping ``window`` outstanding."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.identity = Identity.generate()
        self.session = secrets.token_hex(8)
        self.ws: ClientConnection | None = None
        self.seq = 0
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.room = asyncio.Event()
        self.window = 0
        self.batch = 0

    async def connect(self) -> None:
        self.ws = await open_ws(self.url)
        await handshake(self.ws, self.identity, "client", session=self.session, timeout=60)

    async def receive(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for data in self.ws:
                if isinstance(data, bytes):
                    self._receive(data)

    def _receive(self, data: bytes) -> None:
        now = time.perf_counter()
        header, _ = p.decode_frame(data)
        if header.get("t") == "error":
            self.errors.append(str(header.get("message"))[:300])
            return
        if header.get("t") != "results":
            return
        for result in header.get("results", []):
            sent = self.sent_at.pop(result.get("key"), None)
            if sent is None:
                continue
            if result.get("status") == "finished":
                self.latencies.append(now - sent)
            else:
                error = result.get("error") or {}
                self.errors.append(f"{result.get('key')}: {error.get('message', result)}"[:300])
        if len(self.sent_at) <= self.window - self.batch:
            self.room.set()

    async def run(self, tasks: int, window: int, batch: int) -> None:
        """Submit ``tasks`` tasks and wait for every result (or error)."""
        assert self.ws is not None
        self.window, self.batch = window, batch
        self.latencies, self.errors = [], []
        left = tasks
        while left > 0:
            while len(self.sent_at) > window - batch:
                self.room.clear()
                await self.room.wait()
            n = min(batch, left)
            await self._submit(n)
            left -= n
        while self.sent_at:
            self.room.clear()
            await self.room.wait()

    async def _submit(self, n: int) -> None:
        assert self.ws is not None
        specs = []
        for _ in range(n):
            self.seq += 1
            specs.append(p.TaskSpec(key=f"t{self.seq}", func=FUNC_HASH, nb=1, runtime=RUNTIME))
        frame = p.encode(p.Submit(tasks=specs, funcs=[FUNC_HASH]), [FUNC_BLOB] + [PAYLOAD] * n)
        now = time.perf_counter()
        for spec in specs:
            self.sent_at[spec.key] = now
        await self.ws.send(frame)


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_clients(clients: list[SimClient], tasks: int, window: int, batch: int,
                      timeout: float) -> dict[str, Any]:
    """Every client runs its share of ``tasks``; returns counts, throughput and latencies."""
    share = [tasks // len(clients) + (i < tasks % len(clients)) for i in range(len(clients))]
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(c.run(n, window, batch) for c, n in zip(clients, share,
                                                                             strict=True)))
        finished = True
    except TimeoutError:
        finished = False
    elapsed = time.perf_counter() - start
    lat = sorted(x for c in clients for x in c.latencies)
    errors = [e for c in clients for e in c.errors]
    return {
        "finished": finished, "planned": tasks, "done": len(lat), "errors": len(errors),
        "first_errors": errors[:3], "elapsed_s": elapsed,
        "tasks_per_s": len(lat) / elapsed if elapsed else 0.0,
        "latencies_ms": {"p50": percentile(lat, 0.5) * 1e3, "p99": percentile(lat, 0.99) * 1e3,
                         "mean": statistics.fmean(lat) * 1e3 if lat else float("nan"),
                         "max": lat[-1] * 1e3 if lat else float("nan")},
    }


# --------------------------------------------------------------------------- command loop


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def commands():
    """JSON commands from stdin, one a line, until EOF."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        if line.strip():
            yield json.loads(line)


async def serve_providers(url: str, price_cpu: float) -> None:
    fleet = ProviderFleet(url, price_cpu)
    async with fleet.tg:
        async for cmd in commands():
            try:
                if cmd["cmd"] == "add":
                    await fleet.add(int(cmd["n"]))
                elif cmd["cmd"] == "close":
                    await fleet.close(int(cmd["n"]))
                elif cmd["cmd"] == "quit":
                    break
                reply(fleet.status())
            except Exception as exc:
                reply({"error": f"{type(exc).__name__}: {exc}", **fleet.status()})
        await fleet.close(len(fleet.live))


async def serve_clients(url: str, count: int) -> None:
    clients = [SimClient(url) for _ in range(count)]
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one(client: SimClient) -> None:
        async with gate:
            await client.connect()

    async with asyncio.TaskGroup() as tg:
        await asyncio.gather(*(one(c) for c in clients))
        readers = [tg.create_task(c.receive()) for c in clients]
        reply({"connected": len(clients)})
        async for cmd in commands():
            if cmd["cmd"] == "run":
                reply(await run_clients(clients, int(cmd["tasks"]), int(cmd["window"]),
                                        int(cmd["batch"]), float(cmd.get("timeout", 300))))
            elif cmd["cmd"] == "quit":
                break
        for c in clients:
            assert c.ws is not None
            await c.ws.close()
        for r in readers:
            r.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=("providers", "clients"))
    ap.add_argument("url")
    ap.add_argument("--price-cpu", type=float, default=0.001,
                    help="tokens per CPU-second the simulated providers post (0: free)")
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise_open_files_limit()
    if args.role == "providers":
        asyncio.run(serve_providers(args.url, args.price_cpu))
    else:
        asyncio.run(serve_clients(args.url, args.clients))


if __name__ == "__main__":
    main()
