"""Per-task cost of each hot-path piece changed for issue 11, old code against new, in one process.

End-to-end CPU per task moves with the machine's load (a shared 2-core box); these pieces are
timed alone, best of several repeats, so the saving of each change is visible. The old code is
taken from git (``--base``, default the commit before the change), imported under another name.

    .venv/bin/python benchmarks/hotpath_micro.py [--base 89a3169]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import timeit
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def old_module(base: str, path: str, name: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{base}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{base}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module


def best_us(fn, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def metering(base: str) -> list[tuple[str, float, float]]:
    import psutil

    from provider import metering
    from provider.sandbox import (
        Limits,
        cleanup,
        kill_cgroup,
        probe_isolation,
        sandbox_spec,
        worker_pid,
    )
    old = old_module(base, "provider/metering.py", "old_metering")
    rows = []
    iso = probe_isolation()
    spec = sandbox_spec([sys.executable, "-c", "import time; print('up', flush=True); "
                         "time.sleep(300)"], limits=Limits(), isolation=iso)
    proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        ps = psutil.Process(worker_pid(spec, proc.pid))
        where = "cgroup" if spec.cgroup else "no cgroup"
        rows.append((f"metering, Meter()+sample() per task, sandboxed worker ({where})",
                     best_us(lambda: old.Meter(ps).sample(), 2000),
                     best_us(lambda: metering.Meter(ps).sample(), 2000)))
        plain = psutil.Process(os.getpid())
        rows.append(("metering, Meter()+sample() per task, plain process (no cgroup)",
                     best_us(lambda: old.Meter(plain, cgroup=None).sample(), 2000),
                     best_us(lambda: metering.Meter(plain, cgroup=None).sample(), 2000)))
    finally:
        if spec.cgroup is not None:
            kill_cgroup(spec.cgroup)
        proc.kill()
        proc.wait(10)
        cleanup(spec)
    return rows


def channel(base: str) -> list[tuple[str, float, float]]:
    from gateway.protocol import frame_parts, frame_size
    from provider.channel import read_frame, send_frame
    from provider.worker import LENGTH
    old = old_module(base, "provider/channel.py", "old_channel")
    frame = frame_parts({"t": "run", "key": "k" * 40, "func": "f" * 32, "has_func": False,
                         "memory": None, "nb": 1, "output_limit": None}, [b"x" * 40])
    reply = LENGTH.pack(frame_size(frame)) + b"".join(frame)
    n = 3000

    async def old_send(a: socket.socket, b: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            await loop.sock_sendall(a, LENGTH.pack(frame_size(frame)))
            for part in frame:
                await loop.sock_sendall(a, part)
            b.recv(65536)

    async def new_send(a: socket.socket, b: socket.socket) -> None:
        for _ in range(n):
            await send_frame(a, frame)
            b.recv(65536)

    async def reads(read, a: socket.socket, b: socket.socket) -> None:
        for _ in range(n):
            b.send(reply)
            await read(a)

    def timed(make) -> float:
        def once() -> None:
            a, b = socket.socketpair()
            a.setblocking(False)
            try:
                asyncio.run(make(a, b))
            finally:
                a.close()
                b.close()
        return min(timeit.repeat(once, number=1, repeat=5)) / n * 1e6

    echo = ("import socket, struct, sys\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "L = struct.Struct('!Q')\n"
            "def exactly(n):\n"
            "    buf = bytearray(n); v = memoryview(buf); pos = 0\n"
            "    while pos < n:\n"
            "        got = s.recv_into(v[pos:])\n"
            "        if not got: sys.exit(0)\n"
            "        pos += got\n"
            "    return buf\n"
            "while True:\n"
            "    exactly(L.unpack(exactly(8))[0])\n"
            "    s.sendall(bytes.fromhex(sys.argv[2]))\n")

    def worker_round_trips(send) -> float:
        """Send a run frame to a real worker-like process (it reads length, then body, as
        provider.worker.Channel does) and read its reply: the wake-ups are real."""
        def once() -> None:
            a, b = socket.socketpair()
            child = subprocess.Popen([sys.executable, "-c", echo, str(b.fileno()),
                                      reply.hex()], pass_fds=[b.fileno()])
            b.close()
            a.setblocking(False)

            async def run() -> None:
                for _ in range(n):
                    await send(a)
                    await read_frame(a)
            try:
                asyncio.run(run())
            finally:
                a.close()
                child.wait(10)
        return min(timeit.repeat(once, number=1, repeat=3)) / n * 1e6

    async def send_old(a: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(a, LENGTH.pack(frame_size(frame)))
        for part in frame:
            await loop.sock_sendall(a, part)

    async def send_new(a: socket.socket) -> None:
        await send_frame(a, frame)

    return [("worker pipe, run frame + reply round trip with a worker process (wall)",
             worker_round_trips(send_old), worker_round_trips(send_new)),
            ("worker pipe, send one run frame (3 sendall -> 1 sendmsg)",
             timed(old_send), timed(new_send)),
            ("worker pipe, read one reply already there (incl. the test's send)",
             timed(lambda a, b: reads(old.read_frame, a, b)),
             timed(lambda a, b: reads(read_frame, a, b)))]


def serialize(base: str) -> list[tuple[str, float, float]]:
    from notebook_ext import serialize as new
    old = old_module(base, "notebook_ext/serialize.py", "old_serialize")
    ns: dict = {"__name__": "__main__"}
    exec("OFFSET = 1\ndef inc(x):\n    return x + OFFSET\n", ns)  # noqa: S102
    inc = ns["inc"]
    return [("client, dumps_function(inc) per submit (cache)",
             best_us(lambda: old.dumps_function(inc), 3000),
             best_us(lambda: new.dumps_function(inc), 3000)),
            ("client, dumps_args((i,), {}) per task (C pickler for plain values)",
             best_us(lambda: old.dumps_args((5,), {}), 20000),
             best_us(lambda: new.dumps_args((5,), {}), 20000)),
            ("client, local_runtime() per task (computed once)",
             best_us(old.local_runtime, 20000), best_us(new.local_runtime, 20000))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="89a3169")
    args = ap.parse_args()
    rows = metering(args.base) + channel(args.base) + serialize(args.base)
    print("| piece | before (µs) | after (µs) | saved (µs) |")
    print("| --- | ---: | ---: | ---: |")
    for name, before, after in rows:
        print(f"| {name} | {before:.1f} | {after:.1f} | {before - after:.1f} |")


if __name__ == "__main__":
    main()
