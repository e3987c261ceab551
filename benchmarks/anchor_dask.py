"""Dask anchors: the threaded scheduler (row 4's floor) and Dask distributed (rows 1-4).

Distributed runs as ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
dashboard_address=None)`` + ``Client``, started and closed inside this process.

Usage: python benchmarks/anchor_dask.py --out FILE [--quick]   (run.py does this)
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    ROWS,
    SUM_CHUNKS,
    SUM_SHAPE,
    begin,
    dask_sum_row,
    log,
    measure_futures,
    note_strays,
    parse_args,
)

SYSTEM = "dask"
SUM_DETAIL = (
    f"da.random.random({SUM_SHAPE}, chunks={SUM_CHUNKS}).sum().compute(); "
    "new array (new keys) each repetition"
)


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    cfg, rec = begin(SYSTEM, parse_args(__doc__ or ""))

    import dask
    import distributed
    import numpy as np

    rec.set(
        "versions",
        {"dask": dask.__version__, "distributed": distributed.__version__, "numpy": np.__version__},
    )
    # The 100 MiB argument is the point of row 3: silence "large object in task graph" advice.
    warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
    warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")

    # Row 4 floor first, while no cluster is running: the threaded scheduler, 2 threads.
    dask_sum_row(
        rec,
        cfg,
        "dask_sum_threaded",
        SUM_DETAIL + ", scheduler='threads', num_workers=2",
        scheduler="threads",
        num_workers=2,
    )

    from distributed import Client, LocalCluster

    try:
        start = time.perf_counter()
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(2, timeout=60)
            rec.set("startup_s", round(time.perf_counter() - start, 3))
            log(
                SYSTEM,
                f"cluster up in {time.perf_counter() - start:.1f}s: "
                f"{len(client.scheduler_info()['workers'])} workers",
            )
            # pure=False: every repetition is a new task (and row 3 fresh data), nothing cached
            measure_futures(
                client, rec, cfg, inc, submit_kwargs={"pure": False}, latency_timeout=60
            )
            dask_sum_row(
                rec,
                cfg,
                "dask_sum",
                SUM_DETAIL + ", scheduler=client (2 workers x 1 thread)",
                scheduler=client,
            )
    except Exception as exc:
        rec.fail_missing(ROWS, f"Dask distributed failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        note_strays(rec)
        rec.finish()


if __name__ == "__main__":
    main()
