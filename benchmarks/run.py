"""Side-by-side benchmark: decompute against its floor and anchors, in one run.

Runs each system in its own subprocess (its own session, so everything it starts can be stopped),
one after the other, then prints a Markdown table of the four DESIGN "Performance bars" rows
and writes benchmarks/results/latest.json. Nothing here asserts speed: a system or row that
cannot be measured shows "n/a (reason)".

    .venv/bin/python benchmarks/run.py                 # full run (what `make bench` does)
    .venv/bin/python benchmarks/run.py --quick         # smoke test: fewer repetitions
    .venv/bin/python benchmarks/run.py --only dask,decompute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import HERE, ROOT, ROWS, settings  # noqa: E402

# name -> (script, timeout in seconds for a full run, for a --quick run)
SYSTEMS: dict[str, tuple[str, float, float]] = {
    "floor": ("floor.py", 120, 60),
    "dask": ("anchor_dask.py", 180, 90),
    "ipyparallel": ("anchor_ipyparallel.py", 180, 90),
    "decompute": ("bench_decompute.py", 240, 120),
}

# key -> (measure label, unit, higher is better, DESIGN goal for decompute)
MEASURES: dict[str, tuple[str, str, bool, str]] = {
    "latency": ("1. one trivial task, submit → result", "ms, lower is better", False, "≤ 1.0 ms"),
    "map": ("2. {tasks} tiny tasks via map", "tasks/s, higher is better", True, "≥ 10,000"),
    "numpy": ("3. 100 MiB numpy argument, submit(np.sum)", "s, lower is better", False, "≤ 0.25 s"),
    "dask_sum": (
        "4. `da.random.random((8000,8000), chunks=1000).sum()`, 2 workers",
        "s, lower is better",
        False,
        "≤ 0.45 s",
    ),
    "scatter_reuse": ("5. same 100 MiB, a second task on `scatter`ed data", "s, lower is better",
                      False, "≤ 0.010 s"),
    "gib_round_trip": ("6. 1 GiB array argument and result, round trip", "s, lower is better",
                       False, "gateway RSS < +200 MiB"),
}

PACKAGES = (
    "decompute",
    "numpy",
    "dask",
    "distributed",
    "ipyparallel",
    "websockets",
    "cloudpickle",
    "msgpack",
    "pyzmq",
    "tornado",
    "psutil",
)

CELL_REASON_CHARS = 90


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "versions": versions,
        # reported as found; the harness never sets or changes these
        "blas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},
    }


# ------------------------------------------------------------------------------- running
def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[str]:
    """Describe the processes of a process group (best effort, needs psutil)."""
    try:
        import psutil
    except ImportError:
        return []
    members = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                members.append(f"pid {proc.pid}: {' '.join(proc.info['cmdline'] or [])[:160]}")
    return members


def wait_group_empty(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_system(proc: subprocess.Popen, grace: float) -> list[str]:
    """Stop a system script: SIGTERM to it only (it then shuts its cluster or gateway down in
    order), then after ``grace`` seconds SIGKILL to its whole process group.
    Returns the processes that had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    if proc.poll() is not None and wait_group_empty(proc.pid, 5):
        return []
    killed = group_members(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_group_empty(proc.pid, 10)
    return killed


def sweep_group(pgid: int, grace: float) -> list[str]:
    """After the script exited (and was reaped): stop what is left of its process group.
    A pgid cannot be reused while any member is alive, so signalling it is safe."""
    if wait_group_empty(pgid, grace):
        return []
    members = group_members(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if wait_group_empty(pgid, 5):
            break
    return members


#: Before each system, wait (at most SETTLE_MAX_S) for the machine to be this idle: the last
#: system's processes wind down, so the next one does not run on a busy machine.
SETTLE_BUSY_PERCENT = 25.0
SETTLE_MAX_S = 60.0


def settle() -> float:
    """Seconds waited until CPU use over one second fell below ``SETTLE_BUSY_PERCENT``."""
    import psutil

    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_MAX_S:
        if psutil.cpu_percent(interval=1.0) < SETTLE_BUSY_PERCENT:
            break
    return time.perf_counter() - start


def run_system(name: str, quick: bool, workdir: Path) -> dict[str, Any]:
    script, full_timeout, quick_timeout = SYSTEMS[name]
    timeout = quick_timeout if quick else full_timeout
    waited = settle()
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(HERE / script), "--out", str(out)]
    if quick:
        cmd.append("--quick")
    load = os.getloadavg()[0]
    log(f"{name}: {' '.join(cmd[1:])} (timeout {timeout:.0f}s, load average {load:.2f}, "
        f"after {waited:.0f} s waiting for an idle machine)")
    start = time.perf_counter()
    problem = None
    # Own session: on timeout the whole group (clusters, gateways, ...) can be stopped, and the
    # child's progress goes to our stderr so stdout carries only the table.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sys.stderr, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        problem = f"timed out after {timeout:.0f}s"
        log(f"{name}: {problem}; stopping it")
        killed = stop_system(proc, grace=30)
        if killed:
            problem += f"; SIGKILLed after 30 s: {'; '.join(killed)}"
    except BaseException:  # Ctrl-C: stop the system too
        stop_system(proc, grace=10)
        raise
    elapsed = time.perf_counter() - start
    # Helpers such as multiprocessing's resource tracker exit a moment after their parent.
    strays = sweep_group(proc.pid, grace=10)

    data: dict[str, Any] = {"rows": {}, "notes": []}
    if out.exists():
        try:
            data = json.loads(out.read_text())
        except ValueError as exc:
            data["notes"].append(f"unreadable results file: {exc}")
    if strays:
        data.setdefault("notes", []).append(
            f"still running 10 s after it exited, then stopped: {'; '.join(strays)}"
        )
    if problem is None and proc.returncode != 0:
        problem = f"exited with code {proc.returncode}"
    if problem:
        data.setdefault("notes", []).append(problem)
    rows = data.setdefault("rows", {})
    for key in ROWS:
        if key not in rows:
            rows[key] = {"value": None, "error": problem or "not measured"}
        elif rows[key].get("value") is None and not rows[key].get("error"):
            rows[key]["error"] = problem or "no value recorded"
    data["exit_code"] = proc.returncode
    data["load_before"] = round(load, 2)
    data["wall_s"] = round(elapsed, 2)
    log(f"{name}: done in {elapsed:.1f}s (exit {proc.returncode})")
    return data


# ------------------------------------------------------------------------------- table
def fmt_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit in ("tasks/s", "msg/s"):
        return f"{value:,.0f} {unit}"
    if unit.startswith("MiB/s"):
        return f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.4g} {unit}"


def clean(text: str, limit: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cell(system: dict[str, Any] | None, key: str) -> str:
    if system is None:
        return "not run"
    row = system.get("rows", {}).get(key)
    if not row:
        return "n/a (not measured)"
    if row.get("value") is None:
        return f"n/a ({clean(row.get('error') or 'no value', CELL_REASON_CHARS)})"
    text = fmt_value(row["value"], row.get("unit", ""))
    if row.get("n") is not None and row.get("planned") and row["n"] < row["planned"]:
        text += f" (n={row['n']})"
    return text


def value(system: dict[str, Any] | None, key: str) -> float | None:
    if system is None:
        return None
    row = system.get("rows", {}).get(key) or {}
    v = row.get("value")
    return v if isinstance(v, (int, float)) else None


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "—"
    return f"{num / den:.2f}×"


def floor_value(results: dict[str, Any], key: str) -> float | None:
    """The floor's number for a row (Dask's threaded scheduler for the array row)."""
    if key == "dask_sum":
        return value(results.get("dask"), "dask_sum_threaded")
    if key == "numpy":  # the floor's one hop: half its store-and-forward two-hop time
        e2e = ((results.get("floor") or {}).get("rows", {}).get("numpy") or {}).get(
            "end_to_end_s")
        return e2e / 2 if e2e else None
    return value(results.get("floor"), key)


def floor_cell(results: dict[str, Any], key: str) -> str:
    if key == "dask_sum":  # row 4's floor is Dask's threaded scheduler (measured with dask)
        dask = results.get("dask")
        if dask is None:
            return "not run"
        return "threaded: " + cell(dask, "dask_sum_threaded")
    floor = results.get("floor")
    text = cell(floor, key)
    if floor is None or value(floor, key) is None:
        return text
    if key == "latency":
        return text + " (3-process relay)"
    if key == "map":
        return text.replace("msg/s", "msg/s relayed")
    if key == "numpy":
        e2e = floor["rows"]["numpy"].get("end_to_end_s")
        return text + (f" ({e2e / 2:.3f} s one hop, {e2e:.3f} s for 2)" if e2e else "")
    return text


def render(results: dict[str, Any], machine: dict[str, Any], quick: bool) -> str:
    tasks = settings(quick)["map_tasks"]
    lines = []
    title = "decompute benchmark" + (
        " (--quick: fewer repetitions, indicative only)" if quick else ""
    )
    lines.append(f"## {title}")
    lines.append("")
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines.append(
        f"- machine: {machine['cpu_count']} cores ({machine['usable_cpus']} usable), "
        f"{machine['cpu_model'] or 'unknown CPU'}, {machine['memory_gib']} GiB RAM, "
        f"{machine['platform']}"
    )
    lines.append(f"- python: {machine['python']}")
    lines.append(f"- libraries: {versions}")
    if machine["blas_env"]:
        lines.append(f"- BLAS environment (as found): {machine['blas_env']}")
    lines.append(
        "- other work on the machine skews every column: compare columns of one run, "
        "on an idle machine (the load averages are in the notes)"
    )
    lines.append(
        "- values are medians over repetitions; ratios are decompute / anchor "
        "(for tasks/s a ratio above 1 means decompute is faster, for ms and s below 1)"
    )
    lines.append("")
    header = [
        "measure",
        "floor (raw websockets)",
        "Dask distributed",
        "ipyparallel",
        "decompute",
        "decompute / floor",
        "decompute / dask",
        "decompute / ipyparallel",
        "DESIGN goal",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    for key, (label, unit, _higher, goal) in MEASURES.items():
        decompute = value(results.get("decompute"), key)
        name = f"{label.format(tasks=f'{tasks:,}')} ({unit})"
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    floor_cell(results, key),
                    cell(results.get("dask"), key),
                    cell(results.get("ipyparallel"), key),
                    cell(results.get("decompute"), key),
                    ratio(decompute, floor_value(results, key)),
                    ratio(decompute, value(results.get("dask"), key)),
                    ratio(decompute, value(results.get("ipyparallel"), key)),
                    goal,
                ]
            )
            + " |"
        )
    lines.append("")
    notes = notes_for(results)
    if notes:
        lines.append("Notes:")
        lines.extend(f"- {clean(n, 600)}" for n in notes)
    return "\n".join(lines)


def notes_for(results: dict[str, Any]) -> list[str]:
    notes = []
    for name, data in results.items():
        timing = f"{name}: ran {data.get('wall_s', '?')} s"
        if data.get("load_before") is not None:
            timing += f", 1-min load average before it {data['load_before']}"
        if data.get("startup_s") is not None:
            timing += f" (startup {data['startup_s']} s)"
        notes.append(timing)
        long_errors: dict[str, list[str]] = {}
        for key, row in data.get("rows", {}).items():
            if row.get("value") is None and row.get("error"):
                if len(row["error"]) > CELL_REASON_CHARS:
                    long_errors.setdefault(row["error"], []).append(key)
            elif row.get("n") is not None and row.get("planned") and row["n"] < row["planned"]:
                notes.append(
                    f"{name} / {key}: {row['n']} of {row['planned']} repetitions "
                    "(time budget for the row reached)"
                )
        for error, keys in long_errors.items():
            notes.append(f"{name} / {', '.join(keys)}: {error}")
        for text in data.get("notes", []):
            notes.append(f"{name}: {text}")
    floor = results.get("floor")
    single = value(floor, "numpy_single_frame")
    if single is not None:
        notes.append(
            f"floor: the same 100 MiB as one single websocket frame per hop: "
            f"{single:,.0f} MiB/s per hop (the table's floor sends 1 MiB fragments)"
        )
    return notes


# ------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and a 1,000-task map (smoke test)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated systems to run: " + ",".join(SYSTEMS)
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=HERE / "results" / "latest.json",
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    args = parser.parse_args()

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    names = [n for n in SYSTEMS if n in names]  # fixed order

    machine = machine_info()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="decompute-bench-") as workdir:
        for name in names:
            try:
                results[name] = run_system(name, args.quick, Path(workdir))
            except Exception as exc:  # the harness itself failed for this system
                results[name] = {
                    "rows": {k: {"value": None, "error": f"harness: {exc}"} for k in ROWS},
                    "notes": [],
                }
    table = render(results, machine, args.quick)
    print(table, flush=True)

    report = {
        "started": started,
        "wall_s": round(time.perf_counter() - t0, 2),
        "quick": args.quick,
        "systems_run": names,
        "machine": machine,
        "design_goals": {k: m[3] for k, m in MEASURES.items()},
        "results": results,
        "table_markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"total {report['wall_s']}s; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
