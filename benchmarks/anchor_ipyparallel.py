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
    Recorder,
    begin,
    descendants,
    latency_row,
    log,
    map_row,
    note_strays,
    numpy_row,
    parse_args,
    short_error,
)

SYSTEM = "ipyparallel"
MEASURED = ("latency", "map", "numpy")
TIMEOUT = 120


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    cfg, rec = begin(SYSTEM, parse_args(__doc__ or ""))
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
        note_strays(rec, started)
        shutil.rmtree(ipython_dir, ignore_errors=True)
        rec.finish()


def measure(rc, rec: Recorder, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    view = rc.load_balanced_view()
    counter = iter(range(10**9))

    def one_trivial() -> float:
        start = time.perf_counter()
        view.apply_async(inc, next(counter)).get(timeout=TIMEOUT)
        return time.perf_counter() - start

    latency_row(rec, cfg, one_trivial, "view.apply_async(inc, i).get(), load-balanced view")
    rc.purge_everything()

    def one_map(count: int) -> float:
        start = time.perf_counter()
        results = view.map_async(inc, range(count)).get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        if len(results) != count:
            raise RuntimeError(f"got {len(results)} results of {count}")
        rc.purge_everything()  # keep the hub and client caches from growing between reps
        return elapsed

    map_row(
        rec,
        cfg,
        one_map,
        lambda count: f"view.map_async(inc, range({count})).get() (chunksize=1: one task per item)",
    )

    def one_numpy(arr: np.ndarray) -> float:
        start = time.perf_counter()
        view.apply_async(np.sum, arr).get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        rc.purge_everything()  # the hub's DictDB keeps request buffers otherwise
        return elapsed

    numpy_row(
        rec, cfg, one_numpy, "view.apply_async(np.sum, arr).get(), arr = fresh 100 MiB float64"
    )


if __name__ == "__main__":
    main()
