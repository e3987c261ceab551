"""Scale: one gateway, up to 1,000 simulated providers and 100 simulated clients (issue 11).

Starts ONE real gateway (``python -m gateway --host 127.0.0.1 --port P --db TMP/scale.sqlite
--faucet 1000000``, its own DECOMPUTE_HOME), then two simulator processes
(``benchmarks/scale_sim.py``): one holding every provider connection (priced, so escrow,
settlement and receipts are on), one holding every client connection. Both speak the real wire
protocol and do no work of their own, so the gateway is what is measured.

Order: gateway RSS with nothing connected; providers connected idle (RSS per idle connection);
clients connected; then the same client load (``--tasks`` tiny tasks, each client keeping
``--window`` outstanding in batches of ``--batch``) at each provider count, largest first
(providers are closed between phases). Per phase: gateway CPU seconds (psutil, user + system)
over the phase / tasks completed, tasks/s, p50 and p99 submit -> result latency; and the
gateway's idle CPU (heartbeats, pings, earnings queries) at that provider count.

Nothing here asserts speed. Usage:
    python benchmarks/scale.py --out FILE [--quick] [--providers 10,100,1000] [--clients 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from benchlib import (  # noqa: E402
    HERE,
    ROOT,
    Recorder,
    free_port,
    install_sigterm_handler,
    log,
    note_strays,
    short_error,
    stop_process,
)

SYSTEM = "scale"
READY_DEADLINE_S = 120.0
IDLE_SECONDS = 3.0  # the idle-CPU window at each provider count
SETTLE_SECONDS = 0.5  # after connections change, before measuring


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write results to")
    ap.add_argument("--quick", action="store_true", help="fewer tasks (smoke test)")
    ap.add_argument("--providers", default="10,100,1000",
                    help="provider counts to measure at (comma-separated)")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=0,
                    help="tasks per phase (default 10,000; 3,000 with --quick)")
    ap.add_argument("--window", type=int, default=20, help="tasks each client keeps outstanding")
    ap.add_argument("--batch", type=int, default=10, help="tasks per Submit frame")
    ap.add_argument("--price-cpu", type=float, default=0.001,
                    help="tokens per CPU-second the simulated providers post (0: free)")
    ap.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    return ap.parse_args()


class Sim:
    """A simulator process driven by JSON lines on its stdin/stdout."""

    def __init__(self, role: str, url: str, extra: list[str], log_path: Path) -> None:
        self.role = role
        with log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "scale_sim.py"), role, url, *extra], cwd=ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} simulator exited ({self.proc.poll()})")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer = self.read()
        if "error" in answer:
            raise RuntimeError(f"{self.role} simulator: {answer['error']}")
        return answer

    def stop(self) -> str:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return stop_process(self.proc, grace=5)


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.loads(response.read())


def wait_health(port: int, proc: subprocess.Popen, ok, what: str) -> dict[str, Any]:
    """Poll ``/health`` until ``ok(health)``; the gateway dying or the deadline raise."""
    deadline = time.monotonic() + READY_DEADLINE_S
    last: Any = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        try:
            last = health(port)
            if ok(last):
                return last
        except OSError as exc:
            last = short_error(exc, 200)
        time.sleep(0.1)
    raise TimeoutError(f"{what} not seen within {READY_DEADLINE_S:.0f}s (last: {last})")


def cpu_seconds(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def rss(ps: psutil.Process) -> int:
    return ps.memory_info().rss


def set_providers(sims: Sim, port: int, gateway: subprocess.Popen, n: int, online: int) -> int:
    """Grow or shrink the simulated providers to ``n`` and wait until the gateway sees them."""
    if n > online:
        sims.ask(cmd="add", n=n - online)
    elif n < online:
        sims.ask(cmd="close", n=online - n)
    wait_health(port, gateway, lambda h: h.get("providers") == n, f"{n} providers online")
    return n


def measure_idle(ps: psutil.Process, seconds: float) -> float:
    """Gateway CPU (cores busy) while nothing is submitted: heartbeats, pings, queries."""
    c0, t0 = cpu_seconds(ps), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(ps) - c0) / (time.perf_counter() - t0)


def run_phase(clients: Sim, ps: psutil.Process, args: argparse.Namespace, tasks: int,
              sims: tuple[Sim, ...] = ()) -> dict[str, Any]:
    """One closed-loop run of ``tasks`` tasks; the gateway's CPU over it, and the simulators'
    (on a 2-core machine they compete with the gateway: what limits tasks/s)."""
    others = [psutil.Process(sim.proc.pid) for sim in sims]
    c0, s0 = cpu_seconds(ps), [cpu_seconds(o) for o in others]
    out = clients.ask(cmd="run", tasks=tasks, window=args.window, batch=args.batch,
                      timeout=240)
    out["gateway_cpu_s"] = cpu_seconds(ps) - c0
    out["cpu_per_task_us"] = out["gateway_cpu_s"] / max(1, out["done"]) * 1e6
    out["gateway_cores"] = out["gateway_cpu_s"] / out["elapsed_s"]
    out["simulator_cores"] = {sim.role: (cpu_seconds(o) - c) / out["elapsed_s"]
                              for sim, o, c in zip(sims, others, s0, strict=True)}
    return out


def main() -> None:
    args = parse_args()
    install_sigterm_handler()
    rec = Recorder(SYSTEM, args.out, args.quick)
    sizes = sorted({int(x) for x in args.providers.split(",") if x.strip()}, reverse=True)
    tasks = args.tasks or (3_000 if args.quick else 10_000)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the gateway inherits it
    rec.set("setup", {"providers": sizes, "clients": args.clients, "tasks_per_phase": tasks,
                      "window": args.window, "batch": args.batch, "price_cpu": args.price_cpu,
                      "open_files_limit": hard})
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "DECOMPUTE_HOME": str(home)}
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
           "--db", str(tmp / "scale.sqlite"), "--faucet", "1000000"]
    rec.set("command", " ".join(cmd[1:]))
    gateway = providers = clients = None
    try:
        with (tmp / "gateway.log").open("wb") as log_file:
            gateway = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT)
        wait_health(port, gateway, lambda h: h.get("status") == "ok", "gateway")
        ps = psutil.Process(gateway.pid)
        time.sleep(SETTLE_SECONDS)
        rss0 = rss(ps)
        providers = Sim("providers", url, ["--price-cpu", str(args.price_cpu)],
                        tmp / "providers.log")
        start = time.perf_counter()
        online = set_providers(providers, port, gateway, sizes[0], 0)
        connect_s = time.perf_counter() - start
        time.sleep(SETTLE_SECONDS)
        with rec.row("rss_per_idle_connection") as row:
            per = (rss(ps) - rss0) / sizes[0]
            row.update(value=per / 1024, unit="KiB", n=sizes[0],
                       detail=f"gateway RSS with {sizes[0]} idle provider connections minus "
                       f"RSS with none ({rss0 / 2**20:.1f} MiB), / {sizes[0]}; "
                       f"{sizes[0]} handshakes took {connect_s:.1f} s")
        clients = Sim("clients", url, ["--clients", str(args.clients)], tmp / "clients.log")
        clients.read()  # {"connected": N}
        log(SYSTEM, f"{online} providers, {args.clients} clients connected; warming up")
        run_phase(clients, ps, args, min(tasks, 2_000))  # warm-up: slow start, first funcs
        phases: dict[int, dict[str, Any]] = {}
        for n in sizes:
            online = set_providers(providers, port, gateway, n, online)
            time.sleep(SETTLE_SECONDS)
            idle = measure_idle(ps, args.idle_seconds)
            with rec.row(f"cpu_per_task_{n}") as row:
                phase = run_phase(clients, ps, args, tasks, (providers, clients))
                phase["idle_cpu_cores"] = idle
                phases[n] = phase
                if not phase["finished"] or phase["errors"]:
                    raise RuntimeError(f"{phase['done']} of {tasks} tasks done, "
                                       f"{phase['errors']} errors: {phase['first_errors']}")
                net = (phase["gateway_cpu_s"] - idle * phase["elapsed_s"]) / phase["done"] * 1e6
                row.update(value=phase["cpu_per_task_us"], unit="µs", phase=phase,
                           net_of_idle_us=net,
                           detail=f"gateway CPU / task with {n} providers, {args.clients} "
                           f"clients; idle gateway CPU there {idle * 100:.1f}% of a core")
            busy = ", ".join(f"{k} {v:.2f}" for k, v in phase["simulator_cores"].items())
            log(SYSTEM, f"{n} providers: {phase['tasks_per_s']:.0f} tasks/s, p50 "
                f"{phase['latencies_ms']['p50']:.1f} ms, p99 {phase['latencies_ms']['p99']:.1f} "
                f"ms, {phase['cpu_per_task_us']:.0f} µs gateway CPU per task; cores busy: "
                f"gateway {phase['gateway_cores']:.2f}, {busy}, load average "
                f"{os.getloadavg()[0]:.1f}")
        big = phases.get(max(sizes))
        for key, pick, unit in (("tasks_per_s", lambda ph: ph["tasks_per_s"], "tasks/s"),
                                ("latency_p50", lambda ph: ph["latencies_ms"]["p50"], "ms"),
                                ("latency_p99", lambda ph: ph["latencies_ms"]["p99"], "ms")):
            with rec.row(key) as row:
                if big is None:
                    raise RuntimeError(f"the {max(sizes)}-provider phase did not run")
                row.update(value=pick(big), unit=unit,
                           by_providers={n: pick(ph) for n, ph in phases.items()},
                           detail=f"{max(sizes)} providers, {args.clients} clients")
        if len(sizes) > 1:
            with rec.row("cpu_ratio") as row:
                lo, hi = phases[min(sizes)], phases[max(sizes)]
                row.update(value=hi["cpu_per_task_us"] / lo["cpu_per_task_us"], unit="×",
                           detail=f"gateway CPU per task at {max(sizes)} providers / at "
                           f"{min(sizes)} (goal: within 1.2)")
            with rec.row("cpu_ratio_net_of_idle") as row:
                lo_net = rec.data["rows"][f"cpu_per_task_{min(sizes)}"]["net_of_idle_us"]
                hi_net = rec.data["rows"][f"cpu_per_task_{max(sizes)}"]["net_of_idle_us"]
                row.update(value=hi_net / lo_net, unit="×",
                           detail="the same ratio with each phase's idle gateway CPU (heartbeats, "
                           "pings, earnings queries: a cost per second, not per task) taken out")
        print(table(rec.data["rows"], sizes), flush=True)
    except Exception as exc:
        rec.note(f"run stopped: {short_error(exc, 400)}")
        raise
    finally:
        for sim in (clients, providers):
            if sim is not None:
                sim.stop()
        if gateway is not None:
            rec.set("gateway_stopped", stop_process(gateway, grace=20, first=signal.SIGINT))
        note_strays(rec)
        rec.set("gateway_log_tail", (tmp / "gateway.log").read_text(errors="replace")[-2000:])
        shutil.rmtree(tmp, ignore_errors=True)
        rec.finish()


def table(rows: dict[str, Any], sizes: list[int]) -> str:
    """The rows as a Markdown table (what ``make bench`` prints)."""
    lines = ["| scale measure | value |", "| --- | --- |"]
    for n in sorted(sizes):
        row = rows.get(f"cpu_per_task_{n}", {})
        if row.get("value") is None:
            lines.append(f"| gateway CPU per task, {n} providers | n/a ({row.get('error')}) |")
            continue
        ph = row["phase"]
        lines.append(f"| gateway CPU per task, {n} providers | {row['value']:.0f} µs "
                     f"({row['net_of_idle_us']:.0f} µs net of idle {ph['idle_cpu_cores'] * 100:.1f}"
                     f"%; {ph['tasks_per_s']:,.0f} tasks/s, p50 {ph['latencies_ms']['p50']:.1f} "
                     f"ms, p99 {ph['latencies_ms']['p99']:.1f} ms) |")
    for key, label in (("cpu_ratio", "CPU per task ratio, most / fewest providers (goal ≤ 1.2)"),
                       ("cpu_ratio_net_of_idle", "the same ratio, net of idle gateway CPU"),
                       ("rss_per_idle_connection", "gateway RSS per idle provider connection"),
                       ("tasks_per_s", "tasks/s, most providers"),
                       ("latency_p50", "task latency p50, most providers"),
                       ("latency_p99", "task latency p99, most providers")):
        row = rows.get(key, {})
        value = row.get("value")
        text = f"{value:.3g} {row.get('unit', '')}" if value is not None else \
            f"n/a ({row.get('error')})"
        lines.append(f"| {label} | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
