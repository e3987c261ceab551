"""ipyparallel anchor, rows 1-3: ``ipp.Cluster(n=2)`` started and stopped in this run,
tasks through a load-balanced view. Row 4 is not measured (no Dask-collection scheduler).

The cluster's profile lives in a temporary IPYTHONDIR, removed at the end, so the run leaves
nothing in ~/.ipython. If ipyparallel cannot start here, rows 1-3 record the reason.

Usage: python benchmarks/anchor_ipyparallel.py --out FILE [--quick]   (run.py does this)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    NUMPY_BYTES,
    Recorder,
    descendants,
    install_sigterm_handler,
    log,
    parse_args,
    rate_row,
    reap_descendants,
    repeat,
    seconds_row,
    settings,
    short_error,
)

SYSTEM = "ipyparallel"
MEASURED = ("latency", "map", "numpy")
TIMEOUT = 120


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    args = parse_args(__doc__ or "")
    install_sigterm_handler()
    cfg = settings(args.quick)
    rec = Recorder(SYSTEM, args.out, args.quick)
    rec.unavailable("dask_sum", "not measured: ipyparallel has no Dask-collection scheduler here")

    ipython_dir = tempfile.mkdtemp(prefix="bench-ipython-")
    os.environ["IPYTHONDIR"] = ipython_dir  # before importing ipyparallel; engines inherit it
    cluster = None
    started: list = []  # every process of the cluster, snapshotted while it runs
    try:
        try:
            import ipyparallel as ipp

            rec.set("versions", {"ipyparallel": ipp.__version__})
            start = time.perf_counter()
            cluster = ipp.Cluster(n=2)
            rc = cluster.start_and_connect_sync()
            rc.wait_for_engines(2, timeout=60)
            rec.set("startup_s", round(time.perf_counter() - start, 3))
            log(SYSTEM, f"cluster up in {time.perf_counter() - start:.1f}s: engines {rc.ids}")
            started = descendants()
        except Exception as exc:
            rec.fail_missing(MEASURED, f"ipyparallel failed to start: {short_error(exc)}")
            raise
        measure(rc, rec, cfg)
        rc.close()
    finally:
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
                log(SYSTEM, "cluster stopped")
            except Exception as exc:
                rec.note(f"stop_cluster_sync failed: {short_error(exc)}")
        strays = reap_descendants(extra=started)
        if strays:
            rec.note(f"stray processes had to be stopped: {strays}")
        shutil.rmtree(ipython_dir, ignore_errors=True)
        rec.finish()


def measure(rc, rec: Recorder, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    budget = cfg["row_budget_s"]
    view = rc.load_balanced_view()
    counter = iter(range(10**9))

    def one_trivial() -> float:
        start = time.perf_counter()
        view.apply_async(inc, next(counter)).get(timeout=TIMEOUT)
        return time.perf_counter() - start

    with rec.row("latency") as row:
        samples = repeat(
            one_trivial, cfg["latency_reps"], warmup=cfg["latency_warmup"], budget_s=budget
        )
        row.update(
            seconds_row(
                samples,
                planned=cfg["latency_reps"],
                scale=1e3,
                unit="ms",
                detail="view.apply_async(inc, i).get(), load-balanced view",
            )
        )
    rc.purge_everything()

    def one_map(count: int) -> float:
        start = time.perf_counter()
        results = view.map_async(inc, range(count)).get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        if len(results) != count:
            raise RuntimeError(f"got {len(results)} results of {count}")
        rc.purge_everything()  # keep the hub and client caches from growing between reps
        return elapsed

    with rec.row("map") as row:
        count = cfg["map_tasks"]
        one_map(cfg["map_warmup_tasks"])
        durations = repeat(lambda: one_map(count), cfg["map_reps"], budget_s=budget)
        row.update(
            rate_row(
                durations,
                count,
                planned=cfg["map_reps"],
                unit="tasks/s",
                detail=f"view.map_async(inc, range({count})).get() "
                "(chunksize=1: one task per item)",
            )
        )

    rng = np.random.default_rng()

    def one_numpy() -> float:
        arr = rng.random(NUMPY_BYTES // 8)  # fresh data every repetition
        start = time.perf_counter()
        view.apply_async(np.sum, arr).get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        rc.purge_everything()  # the hub's DictDB keeps request buffers otherwise
        return elapsed

    with rec.row("numpy") as row:
        samples = repeat(one_numpy, cfg["numpy_reps"], warmup=1, budget_s=budget)
        row.update(
            seconds_row(
                samples,
                planned=cfg["numpy_reps"],
                detail="view.apply_async(np.sum, arr).get(), arr = fresh 100 MiB float64",
            )
        )


if __name__ == "__main__":
    main()
