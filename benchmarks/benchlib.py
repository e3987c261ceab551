"""Shared helpers for the side-by-side benchmark scripts.

Every system script (``floor.py``, ``anchor_dask.py``, ``anchor_ipyparallel.py``,
``bench_decompute.py``) is run by ``run.py`` as its own subprocess, writes its results to a JSON
file after every row (so a timeout still leaves the rows measured so far) and never asserts
anything about speed: a row that cannot be measured records its reason instead.
"""

from __future__ import annotations

import argparse
import contextlib
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
