"""decompute, rows 1-4, through the public API only (DESIGN.md "Public API").

Starts ``python -m gateway --host 127.0.0.1 --port P --db TMP/bench.sqlite --faucet 1000000
--local-providers 2`` with DECOMPUTE_HOME set to a temporary directory, waits (with a deadline)
until ``GET /health`` shows 2 providers online, then measures with
``notebook_ext.Client(f"ws://127.0.0.1:{P}")``. The gateway is stopped with SIGINT (SIGKILL after
a deadline) and any process it left behind is reported and stopped.

A row that cannot be measured (the code is missing, a call fails, ...) records its reason.

Usage: python benchmarks/bench_decompute.py --out FILE [--quick]   (run.py does this)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    NUMPY_BYTES,
    ROOT,
    ROWS,
    SUM_CHUNKS,
    SUM_SHAPE,
    begin,
    dask_sum_row,
    descendants,
    free_port,
    log,
    measure_futures,
    note_strays,
    parse_args,
    repeat,
    seconds_row,
    short_error,
    stop_process,
)

SYSTEM = "decompute"
PROVIDERS = 2
READY_DEADLINE_S = 60.0
TIMEOUT = 120.0


#: Tokens per CPU-second the local providers post: every task is escrowed, settled and logged.
PRICE_CPU = 0.001


def inc(x: int) -> int:
    return x + 1


def providers_online(health: Any) -> int | None:
    """How many providers /health says are online; accepts a list or an int count."""
    if not isinstance(health, dict):
        return None
    value = health.get("providers")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):  # e.g. {"online": 2, ...}
        online = value.get("online")
        return online if isinstance(online, int) else None
    if isinstance(value, list):
        return sum(1 for p in value if not isinstance(p, dict) or p.get("online", True))
    return None


def tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-limit:].split())


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path) -> dict:
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + READY_DEADLINE_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}: {tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                health = json.loads(response.read())
            online = providers_online(health)
            if online is not None and online >= PROVIDERS:
                return health
            last = f"/health: {json.dumps(health)[:200]}"
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last = short_error(exc, 200)
        time.sleep(0.1)
    raise TimeoutError(
        f"{PROVIDERS} providers not online within {READY_DEADLINE_S:.0f}s "
        f"({last}); gateway log: {tail(log_path, 300)}"
    )


def main() -> None:
    cfg, rec = begin(SYSTEM, parse_args(__doc__ or ""))

    tmp = Path(tempfile.mkdtemp(prefix="bench-decompute-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["DECOMPUTE_HOME"] = str(home)  # this process's client identity, too
    sys.path.insert(0, str(ROOT))
    env = {**os.environ, "DECOMPUTE_HOME": str(home)}
    port = free_port()
    log_path = tmp / "gateway.log"
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(tmp / "bench.sqlite"),
        "--faucet",
        "1000000",
        "--local-providers",
        str(PROVIDERS),
        "--local-price-cpu",  # priced: escrow, settlement and receipts on every task
        str(PRICE_CPU),
    ]
    rec.set("command", " ".join(cmd[1:]))
    gateway = None
    started: list = []
    client = None
    try:
        try:
            with log_path.open("wb") as log_file:
                start = time.perf_counter()
                gateway = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
                )
            health = wait_ready(gateway, port, log_path)
            rec.set("startup_s", round(time.perf_counter() - start, 3))
            rec.set("health", health)
            started = descendants()
            log(SYSTEM, f"gateway on port {port} ready in {time.perf_counter() - start:.1f}s")
        except Exception as exc:
            rec.fail_missing(ROWS, f"gateway not ready: {short_error(exc, 300)}")
            return
        try:
            from notebook_ext import Client

            client = Client(f"ws://127.0.0.1:{port}")
        except Exception as exc:
            rec.fail_missing(ROWS, f"Client() failed: {short_error(exc, 300)}")
            return
        import notebook_ext

        rec.set("versions", {"decompute": getattr(notebook_ext, "__version__", None)})
        measure_futures(
            client,
            rec,
            cfg,
            inc,
            timeout=TIMEOUT,
            wait=lambda futures: wait_all(futures, TIMEOUT),
            check=True,
        )
        bulk_rows(client, rec, cfg, gateway.pid)
        dask_sum_row(
            rec,
            cfg,
            "dask_sum",
            f"da.random.random({SUM_SHAPE}, chunks={SUM_CHUNKS})"
            ".sum().compute(scheduler=client), 2 local providers",
            scheduler=client,
        )
    finally:
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                rec.note(f"client.close() failed: {short_error(exc)}")
        if gateway is not None:
            how = stop_process(gateway, grace=20, first=signal.SIGINT)
            log(SYSTEM, f"gateway {how}")
            if "killed" in how:
                rec.note(f"gateway {how}")
        note_strays(rec, started, "processes still running after the gateway stopped")
        shutil.rmtree(tmp, ignore_errors=True)
        rec.finish()


def bulk_rows(client: Any, rec: Any, cfg: dict, gateway_pid: int) -> None:
    """decompute's own bulk rows: a second task on ``scatter``ed 100 MiB (the data stays on
    the providers), and a 1 GiB array argument's round trip with the gateway's memory growth."""
    import numpy as np
    import psutil

    arr = np.random.default_rng().random(NUMPY_BYTES // 8)
    with rec.row("scatter_reuse") as row:
        data = client.scatter(arr, broadcast=True)  # every provider holds it: no move
        data.result(TIMEOUT)

        def once() -> float:
            start = time.perf_counter()
            client.submit(np.sum, data).result(TIMEOUT)
            return time.perf_counter() - start

        samples = repeat(once, cfg["numpy_reps"] * 4, warmup=4, budget_s=cfg["row_budget_s"])
        row.update(seconds_row(samples, planned=cfg["numpy_reps"] * 4,
                               detail="client.submit(np.sum, client.scatter(a, broadcast=True))"
                                      ", a 100 MiB float64 array already on every provider"))
    del arr
    with rec.row("gib_round_trip") as row:
        big = np.ones(1024**3 // 8)
        gw = psutil.Process(gateway_pid)
        idle = gw.memory_info().rss
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], gw.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            back = client.submit(_plus_one, big).result(600)
        finally:
            stop.set()
            sampler.join()
        took = time.perf_counter() - start
        ok = back.shape == big.shape and back[0] == 2.0
        row.update(seconds_row([took], planned=1, detail=(
            f"submit(x + 1) of a 1 GiB float64 array, result back; gateway RSS +"
            f"{(peak[0] - idle) / 2**20:.0f} MiB at its peak; intact: {ok}")))
        row["gateway_peak_growth_mib"] = round((peak[0] - idle) / 2**20, 1)


def _plus_one(x: Any) -> Any:
    return x + 1


def wait_all(futures: list, timeout: float) -> None:
    """Bound a gather: the futures are concurrent.futures.Future subclasses (DESIGN)."""
    _done, not_done = concurrent.futures.wait(futures, timeout=timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(futures)} tasks not done after {timeout}s")


if __name__ == "__main__":
    main()
