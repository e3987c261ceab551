"""Trivial tasks one at a time against a real gateway: round-trip latency and gateway CPU per task.

Free against priced local providers isolates what escrow, settlement, the receipt-log leaf, the
head signature and the receipt cost a lone task::

    .venv/bin/python benchmarks/trivial_latency.py --price 0        # free providers
    .venv/bin/python benchmarks/trivial_latency.py --price 0.001    # priced: receipts on
    .venv/bin/python benchmarks/trivial_latency.py --price 0.001 --py-spy gw.txt  # + a profile
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def inc(x: int) -> int:
    return x + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_providers(port: int, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r)["providers"] >= n:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{n} providers not online in {timeout} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--price", type=float, default=0.001, help="local providers' CPU price")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long to measure")
    ap.add_argument("--py-spy", metavar="FILE", help="record the gateway with py-spy (raw)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trivial-latency-"))
    os.environ["DECOMPUTE_HOME"] = str(tmp / "home")
    sys.path.insert(0, str(ROOT))
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "--port", str(port), "--db", str(tmp / "l.sqlite"),
           "--faucet", "1000000", "--local-providers", "2", "--local-price-cpu", str(args.price)]
    with (tmp / "gateway.log").open("wb") as log:
        gw = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_providers(port, 2)
        from notebook_ext import Client

        with Client(f"ws://127.0.0.1:{port}", stream_output=False) as client:
            for i in range(50):  # warm: workers started, function cached
                client.submit(inc, i).result(60)
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(gw.pid),
                     "-d", str(int(args.seconds)), "-r", "1000", "-f", "raw", "--threads",
                     "-o", args.py_spy, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proc = psutil.Process(gw.pid)
            before = sum(proc.cpu_times()[:2])
            lat: list[float] = []
            end = time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                client.submit(inc, 1).result(60)
                lat.append(time.perf_counter() - t)
            cpu = sum(proc.cpu_times()[:2]) - before
            if spy is not None:
                spy.wait(60)
        lat.sort()
        print(f"price {args.price:g}: {len(lat)} tasks, median {1e3 * lat[len(lat) // 2]:.3f} ms, "
              f"p90 {1e3 * lat[int(len(lat) * 0.9)]:.3f} ms, gateway CPU per task "
              f"{1e3 * cpu / len(lat):.3f} ms (both its threads)")
    finally:
        gw.terminate()
        gw.wait(30)


if __name__ == "__main__":
    main()
