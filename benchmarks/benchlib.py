"""Shared helpers for the side-by-side benchmark scripts.

Every system script (``floor.py``, ``anchor_dask.py``, ``anchor_ipyparallel.py``,
``bench_decompute.py``) is run by ``run.py`` as its own subprocess, writes its results to a JSON
file after every row (so a timeout still leaves the rows measured so far) and never asserts
anything about speed: a row that cannot be measured records its reason instead.

Rows 1-3 are recorded the same way for every task system (``latency_row``, ``map_row``,
``numpy_row``); ``measure_futures`` measures them for clients with the futures API
(submit/map/gather/result: Dask distributed, decompute), and ``dask_sum_row`` measures row 4.
The task function itself (``inc``) stays in each system script: defined in ``__main__`` it
travels to the workers by value, which cannot import this module.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MIB = 1 << 20
NUMPY_BYTES = 100 * MIB  # row 3: a 100 MiB float64 argument
SUM_SHAPE = (8000, 8000)  # row 4
SUM_CHUNKS = 1000

# The four rows of the DESIGN "Performance bars" table, in order.
ROWS = ("latency", "map", "numpy", "dask_sum")


def settings(quick: bool) -> dict[str, Any]:
    """Repetition counts; ``--quick`` is a smoke test, its numbers are only indicative."""
    if quick:
        return {
            "latency_warmup": 5,
            "latency_reps": 30,
            "map_tasks": 1000,
            "map_warmup_tasks": 50,
            "map_reps": 1,
            "numpy_reps": 2,
            "sum_reps": 2,
            "row_budget_s": 20.0,
        }
    return {
        "latency_warmup": 20,
        "latency_reps": 200,
        "map_tasks": 5000,
        "map_warmup_tasks": 200,
        "map_reps": 3,
        "numpy_reps": 5,
        "sum_reps": 5,
        "row_budget_s": 45.0,
    }


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write results to")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    return parser.parse_args()


def log(system: str, message: str) -> None:
    print(f"[{system}] {message}", file=sys.stderr, flush=True)


def install_sigterm_handler() -> None:
    """Turn SIGTERM (sent by run.py on timeout) into SystemExit so ``finally`` blocks clean up."""

    def _handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)


def begin(system: str, args: argparse.Namespace) -> tuple[dict[str, Any], Recorder]:
    """Start a system script: SIGTERM handling, the repetition counts, an empty results file."""
    install_sigterm_handler()
    return settings(args.quick), Recorder(system, args.out, args.quick)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, found by binding port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_error(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def repeat(
    once: Callable[[], float], reps: int, warmup: int = 0, budget_s: float | None = None
) -> list[float]:
    """Call ``once`` (which returns the duration it measured) ``warmup`` + ``reps`` times.

    Stops early (keeping at least one sample) once ``budget_s`` seconds are spent, so a slow
    system cannot blow the run's time budget; the record then says how many samples it got.
    """
    for _ in range(warmup):
        once()
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        samples.append(once())
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return samples


def seconds_row(
    samples: list[float], *, planned: int, scale: float = 1.0, unit: str = "s", detail: str = ""
) -> dict[str, Any]:
    """Row record for a 'time per operation' measure (lower is better)."""
    values = [s * scale for s in samples]
    return {
        "value": median(values),
        "unit": unit,
        "n": len(values),
        "planned": planned,
        "min": min(values),
        "max": max(values),
        "samples": [round(v, 6) for v in values] if len(values) <= 20 else None,
        "detail": detail,
    }


def rate_row(
    durations: list[float], count: int, *, planned: int, unit: str, detail: str = ""
) -> dict[str, Any]:
    """Row record for a 'things per second' measure (higher is better)."""
    rates = [count / d for d in durations]
    return {
        "value": median(rates),
        "unit": unit,
        "n": len(rates),
        "planned": planned,
        "min": min(rates),
        "max": max(rates),
        "samples": [round(r, 3) for r in rates],
        "detail": detail,
    }


class Recorder:
    """Collects one system's results and writes them to JSON after every change."""

    def __init__(self, system: str, out: Path, quick: bool) -> None:
        self.system = system
        self.out = out
        self.data: dict[str, Any] = {
            "system": system,
            "quick": quick,
            "rows": {},
            "notes": [],
            "error": None,
            "finished": False,
        }
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        log(self.system, f"note: {text}")
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    @contextlib.contextmanager
    def row(self, key: str) -> Iterator[dict[str, Any]]:
        """Measure one row: fill the yielded dict; an exception is recorded, not raised."""
        record: dict[str, Any] = {"value": None, "error": None}
        self.data["rows"][key] = record
        log(self.system, f"{key}: measuring")
        start = time.perf_counter()
        try:
            yield record
        except Exception as exc:  # each row records its own failure, the run goes on
            record["value"] = None
            record["error"] = short_error(exc)
            traceback.print_exc(file=sys.stderr)
        finally:
            record["elapsed_s"] = round(time.perf_counter() - start, 3)
            if record["error"]:
                log(self.system, f"{key}: n/a ({record['error']})")
            elif record.get("value") is None:
                log(self.system, f"{key}: interrupted")
            else:
                log(self.system, f"{key}: {_fmt(record.get('value'))} {record.get('unit', '')}")
            self.save()

    def unavailable(self, key: str, reason: str) -> None:
        self.data["rows"][key] = {"value": None, "error": reason}
        log(self.system, f"{key}: n/a ({reason})")
        self.save()

    def fail_missing(self, keys: tuple[str, ...], reason: str) -> None:
        """Mark every row in ``keys`` that has no record yet as unavailable for ``reason``."""
        for key in keys:
            if key not in self.data["rows"]:
                self.unavailable(key, reason)

    def finish(self) -> None:
        self.data["finished"] = True
        self.save()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def descendants() -> list[Any]:
    """Live descendant processes of this process (psutil objects); [] without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


def reap_descendants(
    extra: list[Any] | tuple[Any, ...] = (),
    wait_first: float = 10.0,
    grace: float = 5.0,
    ignore: tuple[str, ...] = ("resource_tracker",),
) -> list[str]:
    """Make sure every process this run started has ended; describe the ones that had not.

    ``extra`` adds processes that are no longer our descendants (e.g. a snapshot taken before a
    cluster shut down: ipyparallel's engine nannies live in their own sessions). Each gets
    ``wait_first`` seconds to exit by itself, then SIGTERM, then SIGKILL.
    multiprocessing's resource tracker is ignored: it exits on its own with its parent.
    """
    import psutil

    candidates: dict[int, Any] = {}
    for proc in [*descendants(), *extra]:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if not any(word in cmd for word in ignore):
            candidates[proc.pid] = proc
    _gone, alive = psutil.wait_procs(list(candidates.values()), timeout=wait_first)
    described = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
            proc.terminate()
    _gone, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)
    return described


def note_strays(
    rec: Recorder,
    extra: list[Any] | tuple[Any, ...] = (),
    what: str = "stray processes had to be stopped",
) -> None:
    """``reap_descendants(extra)``, noting in the results any process that had not ended."""
    strays = reap_descendants(extra=extra)
    if strays:
        rec.note(f"{what}: {strays}")


def stop_process(proc: Any, grace: float = 10.0, first: int = signal.SIGTERM) -> str:
    """Send ``first`` to a Popen, wait ``grace`` seconds, then SIGKILL. Returns how it ended."""
    if proc.poll() is not None:
        return f"exited {proc.returncode}"
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(first)
    try:
        proc.wait(timeout=grace)
        return f"stopped by {signal.Signals(first).name} (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
        return f"killed after {grace:.0f}s ({signal.Signals(first).name} was not enough)"


# ------------------------------------------------------------------------------- rows 1-4
def latency_row(rec: Recorder, cfg: dict[str, Any], once: Callable[[], float], detail: str) -> None:
    """Row 1: ``once`` runs (and times) one trivial task to its result."""
    with rec.row("latency") as row:
        samples = repeat(
            once, cfg["latency_reps"], warmup=cfg["latency_warmup"], budget_s=cfg["row_budget_s"]
        )
        row.update(
            seconds_row(samples, planned=cfg["latency_reps"], scale=1e3, unit="ms", detail=detail)
        )


def map_row(
    rec: Recorder, cfg: dict[str, Any], once: Callable[[int], float], detail: Callable[[int], str]
) -> None:
    """Row 2: ``once(count)`` runs (and times) ``count`` tiny tasks; ``detail(count)`` says how."""
    with rec.row("map") as row:
        count = cfg["map_tasks"]
        once(cfg["map_warmup_tasks"])
        durations = repeat(lambda: once(count), cfg["map_reps"], budget_s=cfg["row_budget_s"])
        row.update(
            rate_row(
                durations, count, planned=cfg["map_reps"], unit="tasks/s", detail=detail(count)
            )
        )


def numpy_row(
    rec: Recorder, cfg: dict[str, Any], once: Callable[[Any], float], detail: str
) -> None:
    """Row 3: ``once(arr)`` times a remote ``np.sum`` of ``arr``, fresh 100 MiB data each time."""
    import numpy as np

    rng = np.random.default_rng()
    with rec.row("numpy") as row:
        samples = repeat(
            lambda: once(rng.random(NUMPY_BYTES // 8)),
            cfg["numpy_reps"],
            warmup=1,
            budget_s=cfg["row_budget_s"],
        )
        row.update(seconds_row(samples, planned=cfg["numpy_reps"], detail=detail))


def measure_futures(
    client: Any,
    rec: Recorder,
    cfg: dict[str, Any],
    inc: Callable[[int], int],
    *,
    submit_kwargs: dict[str, Any] | None = None,
    timeout: float = 120.0,
    latency_timeout: float | None = None,
    wait: Callable[[list[Any]], object] | None = None,
    check: bool = False,
) -> None:
    """Rows 1-3 for a client with the futures API: ``submit``/``map``/``gather``/``result``.

    ``submit_kwargs`` go to every ``submit`` and ``map`` (and into the row details);
    ``timeout`` bounds each ``result`` (``latency_timeout``, if given, row 1's); ``wait``, if
    given, is called on the map's futures before ``gather`` (to bound that wait). With ``check``
    the map's and the sum's values are verified, otherwise only the number of map results.
    Checks happen after the clock stops.
    """
    import numpy as np

    kwargs = submit_kwargs or {}
    if latency_timeout is None:
        latency_timeout = timeout
    shown = "".join(f", {key}={value!r}" for key, value in kwargs.items())
    counter = itertools.count()

    def one_trivial() -> float:
        start = time.perf_counter()
        client.submit(inc, next(counter), **kwargs).result(timeout=latency_timeout)
        return time.perf_counter() - start

    latency_row(rec, cfg, one_trivial, f"client.submit(inc, i{shown}).result()")

    def one_map(count: int) -> float:
        start = time.perf_counter()
        futures = client.map(inc, range(count), **kwargs)
        if wait is not None:
            wait(futures)
        results = client.gather(futures)
        elapsed = time.perf_counter() - start
        if check:
            if list(results) != [i + 1 for i in range(count)]:
                raise RuntimeError("client.map results are wrong")
        elif len(results) != count:
            raise RuntimeError(f"gathered {len(results)} results of {count}")
        return elapsed

    map_row(
        rec, cfg, one_map, lambda count: f"client.gather(client.map(inc, range({count}){shown}))"
    )

    def one_numpy(arr: Any) -> float:
        start = time.perf_counter()
        total = client.submit(np.sum, arr, **kwargs).result(timeout=timeout)
        elapsed = time.perf_counter() - start
        if check and not np.isclose(total, arr.sum()):
            raise RuntimeError(f"remote sum {total!r} != local sum {arr.sum()!r}")
        return elapsed

    numpy_row(
        rec,
        cfg,
        one_numpy,
        f"client.submit(np.sum, arr{shown}).result(), arr = fresh 100 MiB float64",
    )


def dask_sum_row(
    rec: Recorder, cfg: dict[str, Any], key: str, detail: str, **compute_kwargs: Any
) -> None:
    """Row 4 (or its floor): ``da.random.random(SUM_SHAPE, chunks=SUM_CHUNKS).sum().compute()``."""
    import dask.array as da

    def once() -> float:
        x = da.random.random(SUM_SHAPE, chunks=SUM_CHUNKS)  # new seeds -> new keys every time
        start = time.perf_counter()
        x.sum().compute(**compute_kwargs)
        return time.perf_counter() - start

    with rec.row(key) as row:
        samples = repeat(once, cfg["sum_reps"], warmup=1, budget_s=cfg["row_budget_s"])
        row.update(seconds_row(samples, planned=cfg["sum_reps"], detail=detail))
