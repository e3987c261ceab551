"""Per-task CPU of every process on the hot path (issue 11), and optional py-spy profiles.

Starts ``python -m gateway`` with priced local providers, then runs two phases from this process
(the client): ``trivial`` (N submit -> result, one at a time) and ``map`` (one map of M tiny
tasks). For each phase it prints the CPU seconds per task of the gateway, each provider (with its
workers) and the client, from psutil ``cpu_times`` before/after. With ``--spy DIR`` it records
py-spy profiles (speedscope JSON, ``--nonblocking``) of the gateway, one provider and the client
during each phase.

    .venv/bin/python benchmarks/profile_hotpath.py --trivial 2000 --map 20000 [--spy /tmp/spy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def inc(x: int) -> int:
    return x + 1


def wait_ready(port: int, providers: int, deadline: float = 90.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                health = json.loads(r.read())
            value = health.get("providers")
            online = (value if isinstance(value, int) else
                      value.get("online", 0) if isinstance(value, dict) else
                      len(value) if isinstance(value, list) else 0)
            if online >= providers:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError("providers not online")


def roles(gateway: psutil.Process) -> dict[str, list[psutil.Process]]:
    """gateway itself, each provider (a direct child running ``provider``) with its subtree."""
    out: dict[str, list[psutil.Process]] = {"gateway": [gateway]}
    for n, child in enumerate(gateway.children()):
        out[f"provider{n}"] = [child]
        out[f"provider{n}.workers"] = child.children(recursive=True)
    return out


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def snapshot(gateway: psutil.Process) -> dict[str, float]:
    snap = {role: cpu_of(procs) for role, procs in roles(gateway).items()}
    snap["client"] = cpu_of([psutil.Process()])
    return snap


def spy(pid: int, out: Path, seconds: float) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(exe), "record", "--pid", str(pid), "--format", "speedscope",
                             "--nonblocking", "--rate", "200", "--duration", str(int(seconds)),
                             "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def phase(name: str, gateway: psutil.Process, n: int, run, spy_dir: Path | None,
          spy_seconds: float) -> dict:
    spies = []
    if spy_dir is not None:
        r = roles(gateway)
        busiest = max((k for k in r if k.startswith("provider") and "." not in k),
                      key=lambda k: cpu_of(r[k]))
        targets = {"gateway": gateway.pid, "provider": r[busiest][0].pid,
                   "client": os.getpid()}
        spies = [spy(pid, spy_dir / f"{name}-{role}.json", spy_seconds)
                 for role, pid in targets.items()]
        time.sleep(1.0)  # let py-spy attach
    before, t0 = snapshot(gateway), time.perf_counter()
    run()
    elapsed = time.perf_counter() - t0
    after = snapshot(gateway)
    for s in spies:
        s.wait()
    per_task = {role: round((after[role] - before.get(role, 0.0)) / n * 1e3, 4)
                for role in after}
    return {"phase": name, "tasks": n, "elapsed_s": round(elapsed, 3),
            "ms_per_task_wall": round(elapsed / n * 1e3, 4),
            "tasks_per_s": round(n / elapsed, 1), "cpu_ms_per_task": per_task}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trivial", type=int, default=2000)
    ap.add_argument("--map", type=int, default=20000)
    ap.add_argument("--providers", type=int, default=2)
    ap.add_argument("--price", type=float, default=0.001, help="--local-price-cpu (0: free)")
    ap.add_argument("--spy", type=Path, default=None, help="directory for py-spy profiles")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="profile-hotpath-"))
    (tmp / "home").mkdir()
    os.environ["DECOMPUTE_HOME"] = str(tmp / "home")
    from gateway.local import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), "--db",
           str(tmp / "db.sqlite"), "--faucet", "1000000", "--local-providers",
           str(args.providers), "--local-price-cpu", str(args.price)]
    print("gateway:", " ".join(cmd[1:]), file=sys.stderr)
    log = (tmp / "gateway.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = None
    try:
        wait_ready(port, args.providers)
        gateway = psutil.Process(proc.pid)
        from notebook_ext import Client
        client = Client(f"ws://127.0.0.1:{port}")
        for i in range(50):  # warm up: workers, function caches
            client.submit(inc, i).result(timeout=60)
        client.gather(client.map(inc, range(500)))
        results = []
        if args.spy is not None:
            args.spy.mkdir(parents=True, exist_ok=True)

        def trivial() -> None:
            for i in range(args.trivial):
                assert client.submit(inc, i).result(timeout=60) == i + 1

        def mapped() -> None:
            out = client.gather(client.map(inc, range(args.map)))
            assert out[-1] == args.map

        if args.trivial:
            results.append(phase("trivial", gateway, args.trivial, trivial, args.spy,
                                 args.trivial * 0.003 + 2))
        if args.map:
            results.append(phase("map", gateway, args.map, mapped, args.spy,
                                 args.map * 0.0006 + 2))
        print(json.dumps(results, indent=1))
    finally:
        if client is not None:
            client.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
