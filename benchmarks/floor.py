"""Raw websockets floor: what a 3-process relay costs before any product logic.

client process  --ws-->  relay server process  <--ws--  echo-worker process
(this process)           (binds 127.0.0.1:0)            (dials out to the relay, like providers)

All connections use websockets' asyncio API with ``compression=None`` (no permessage-deflate)
and no message size limit. Rows:

1. trivial round trip client -> relay -> worker -> relay -> client (ms, median);
2. small messages relayed per second, pipelined (full round trips per second);
3. bulk bytes: a 100 MiB message crosses two hops (client -> relay -> worker), the worker
   answers with an 8-byte ack; reported as MiB/s per hop = 2 x 100 MiB / time.

Row 4 has no websockets floor: its floor is Dask's threaded scheduler, measured by anchor_dask.py.

Usage: python benchmarks/floor.py --out FILE [--quick]   (run.py does this)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    MIB,
    NUMPY_BYTES,
    Recorder,
    begin,
    log,
    median,
    note_strays,
    rate_row,
    seconds_row,
    stop_process,
)

SYSTEM = "floor"
BULK_THRESHOLD = 1 * MIB  # the worker acks messages at least this big instead of echoing them
SMALL_MESSAGE = 128  # bytes per message in rows 1-2, about a tiny pickled task
HOPS = 2  # row 3: client -> relay, relay -> worker
# Big messages go out as a fragmented message of 1 MiB frames: on this machine one 100 MiB frame
# moves at well under half the speed (measured here as the extra row "numpy_single_frame").
FRAGMENT = 1 * MIB
WS_OPTIONS = {"compression": None, "max_size": None}


async def send(ws, data, fragment: int | None = FRAGMENT) -> None:  # type: ignore[no-untyped-def]
    """Send ``data``; a big bytes-like message goes as 1 MiB fragments unless ``fragment=None``."""
    if isinstance(data, str) or len(data) < BULK_THRESHOLD:
        await ws.send(data)
        return
    view = memoryview(data).cast("B")
    if fragment:
        await ws.send([view[i : i + fragment] for i in range(0, len(view), fragment)])
    else:
        await ws.send(view)


# --------------------------------------------------------------------------- relay process
async def relay_main() -> None:
    from websockets.asyncio.server import serve

    peers: dict[str, object] = {}
    framing: dict[str, int | None] = {"fragment": FRAGMENT}  # set by the client, see bulk()
    worker_ready = asyncio.Event()
    stop = asyncio.Event()

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        role = await ws.recv()
        if role == "worker":
            peers["worker"] = ws
            worker_ready.set()
            async for message in ws:  # worker -> client
                await send(peers["client"], message)
        elif role == "client":
            peers["client"] = ws
            await worker_ready.wait()
            await ws.send("ready")
            async for message in ws:  # client -> worker
                if isinstance(message, str):
                    if message == "__stop__":
                        stop.set()
                        return
                    if message.startswith("__fragment__ "):
                        size = int(message.split()[1])
                        framing["fragment"] = size or None
                    continue
                await send(peers["worker"], message, framing["fragment"])

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with serve(handler, "127.0.0.1", 0, **WS_OPTIONS) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await stop.wait()
    # leaving the context closes every connection, so the worker sees the close and exits


# -------------------------------------------------------------------------- worker process
async def worker_main(url: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, **WS_OPTIONS) as ws:
        await ws.send("worker")
        async for message in ws:
            if len(message) >= BULK_THRESHOLD:
                await ws.send(struct.pack("<Q", len(message)))
            else:
                await ws.send(message)


# -------------------------------------------------------------------------- client process
async def client_main(url: str, rec: Recorder, cfg: dict) -> None:
    import numpy as np
    from websockets.asyncio.client import connect

    async with connect(url, **WS_OPTIONS) as ws:
        await ws.send("client")
        ready = await asyncio.wait_for(ws.recv(), timeout=30)
        if ready != "ready":
            raise RuntimeError(f"relay said {ready!r} instead of 'ready'")

        payload = os.urandom(SMALL_MESSAGE)

        async def round_trip() -> float:
            start = time.perf_counter()
            await ws.send(payload)
            await ws.recv()
            return time.perf_counter() - start

        with rec.row("latency") as row:
            for _ in range(cfg["latency_warmup"]):
                await round_trip()
            samples = [await round_trip() for _ in range(cfg["latency_reps"])]
            row.update(
                seconds_row(
                    samples,
                    planned=cfg["latency_reps"],
                    scale=1e3,
                    unit="ms",
                    detail=f"{SMALL_MESSAGE}-byte message, 3-process relay round trip",
                )
            )

        async def pipelined(count: int) -> float:
            start = time.perf_counter()

            async def sender() -> None:
                for _ in range(count):
                    await ws.send(payload)

            async def receiver() -> None:
                for _ in range(count):
                    await ws.recv()

            await asyncio.gather(sender(), receiver())
            return time.perf_counter() - start

        with rec.row("map") as row:
            count = cfg["map_tasks"]
            await pipelined(cfg["map_warmup_tasks"])
            durations = [await pipelined(count) for _ in range(cfg["map_reps"] + 2)]
            row.update(
                rate_row(
                    durations,
                    count,
                    planned=cfg["map_reps"] + 2,
                    unit="msg/s",
                    detail=f"{count} pipelined {SMALL_MESSAGE}-byte messages, "
                    "full relayed round trips per second",
                )
            )

        rng = np.random.default_rng()

        async def bulk(fragment: int | None = FRAGMENT) -> float:
            arr = rng.random(NUMPY_BYTES // 8)  # fresh data every repetition
            start = time.perf_counter()
            await send(ws, arr, fragment)
            ack = await ws.recv()
            elapsed = time.perf_counter() - start
            (size,) = struct.unpack("<Q", ack)
            if size != NUMPY_BYTES:
                raise RuntimeError(f"worker acked {size} bytes, sent {NUMPY_BYTES}")
            return elapsed

        for key, fragment in (("numpy", FRAGMENT), ("numpy_single_frame", None)):
            await ws.send(f"__fragment__ {fragment or 0}")  # the relay forwards the same way
            with rec.row(key) as row:
                await bulk(fragment)
                times = [await bulk(fragment) for _ in range(cfg["numpy_reps"])]
                how = "1 MiB fragments" if fragment else "one 100 MiB frame"
                # store-and-forward: each of the 2 hops carries the 100 MiB, so per hop ~ t/2
                row.update(
                    rate_row(
                        times,
                        HOPS * NUMPY_BYTES / MIB,
                        planned=cfg["numpy_reps"],
                        unit="MiB/s per hop",
                        detail=f"100 MiB message ({how}) over 2 hops + 8-byte ack; "
                        "MiB/s per hop = 2 x 100 MiB / t",
                    )
                )
                row["end_to_end_s"] = median(times)

        await ws.send("__stop__")


def read_port(proc: subprocess.Popen, deadline: float) -> int:
    """Read the relay's port (its first stdout line) without blocking past ``deadline``."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode} before reporting its port")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline().strip()
            return int(line)
    raise TimeoutError("relay did not report its port within the deadline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["client", "relay", "worker"], default="client")
    parser.add_argument("--url")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    if args.role == "relay":
        asyncio.run(relay_main())
        return
    if args.role == "worker":
        asyncio.run(worker_main(args.url))
        return

    if args.out is None:
        parser.error("--out is required for the client role")
    cfg, rec = begin(SYSTEM, args)
    import websockets

    rec.set("versions", {"websockets": websockets.__version__})
    rec.unavailable("dask_sum", "no websockets floor; see Dask threaded scheduler")
    me = str(Path(__file__).resolve())
    procs: list[subprocess.Popen] = []
    clean = False
    try:
        relay = subprocess.Popen(
            [sys.executable, me, "--role", "relay"], stdout=subprocess.PIPE, text=True
        )
        procs.append(relay)
        port = read_port(relay, time.monotonic() + 30)
        url = f"ws://127.0.0.1:{port}"
        log(SYSTEM, f"relay on {url}")
        worker = subprocess.Popen([sys.executable, me, "--role", "worker", "--url", url])
        procs.append(worker)
        asyncio.run(client_main(url, rec, cfg))
        clean = True
    except Exception as exc:
        rec.fail_missing(("latency", "map", "numpy"), f"floor failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        # after "__stop__" the relay closes every connection and exits; the worker sees its
        # connection end and exits too. Anything still running after that is stopped.
        for proc in procs:
            how = None
            if clean:
                try:
                    proc.wait(timeout=10)
                    how = f"exited {proc.returncode}"
                except subprocess.TimeoutExpired:
                    pass
            if how is None:
                how = stop_process(proc, grace=5)
            log(SYSTEM, f"pid {proc.pid}: {how}")
        if relay_stdout := (procs[0].stdout if procs else None):
            relay_stdout.close()
        note_strays(rec)
        rec.finish()


if __name__ == "__main__":
    main()
