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
    NUMPY_BYTES,
    ROWS,
    SUM_CHUNKS,
    SUM_SHAPE,
    Recorder,
    install_sigterm_handler,
    log,
    parse_args,
    rate_row,
    reap_descendants,
    repeat,
    seconds_row,
    settings,
)

SYSTEM = "dask"


def inc(x: int) -> int:
    return x + 1


def main() -> None:
    args = parse_args(__doc__ or "")
    install_sigterm_handler()
    cfg = settings(args.quick)
    budget = cfg["row_budget_s"]
    rec = Recorder(SYSTEM, args.out, args.quick)

    import dask
    import dask.array as da
    import distributed
    import numpy as np

    rec.set(
        "versions",
        {"dask": dask.__version__, "distributed": distributed.__version__, "numpy": np.__version__},
    )
    # The 100 MiB argument is the point of row 3: silence "large object in task graph" advice.
    warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
    warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")

    def dask_sum(**compute_kwargs: object) -> float:
        x = da.random.random(SUM_SHAPE, chunks=SUM_CHUNKS)  # new seeds -> new keys every time
        start = time.perf_counter()
        x.sum().compute(**compute_kwargs)
        return time.perf_counter() - start

    sum_detail = (
        f"da.random.random({SUM_SHAPE}, chunks={SUM_CHUNKS}).sum().compute(); "
        "new array (new keys) each repetition"
    )

    # Row 4 floor first, while no cluster is running: the threaded scheduler, 2 threads.
    with rec.row("dask_sum_threaded") as row:
        samples = repeat(
            lambda: dask_sum(scheduler="threads", num_workers=2),
            cfg["sum_reps"],
            warmup=1,
            budget_s=budget,
        )
        row.update(
            seconds_row(
                samples,
                planned=cfg["sum_reps"],
                detail=sum_detail + ", scheduler='threads', num_workers=2",
            )
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
            measure_cluster(client, rec, cfg, dask_sum, sum_detail)
    except Exception as exc:
        rec.fail_missing(ROWS, f"Dask distributed failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        strays = reap_descendants()
        if strays:
            rec.note(f"stray processes had to be stopped: {strays}")
        rec.finish()


def measure_cluster(client, rec: Recorder, cfg: dict, dask_sum, sum_detail: str) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    budget = cfg["row_budget_s"]
    counter = iter(range(10**9))

    def one_trivial() -> float:
        start = time.perf_counter()
        client.submit(inc, next(counter), pure=False).result(timeout=60)
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
                detail="client.submit(inc, i, pure=False).result()",
            )
        )

    def one_map(count: int) -> float:
        start = time.perf_counter()
        futures = client.map(inc, range(count), pure=False)
        results = client.gather(futures)
        elapsed = time.perf_counter() - start
        if len(results) != count:
            raise RuntimeError(f"gathered {len(results)} results of {count}")
        del futures, results
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
                detail=f"client.gather(client.map(inc, range({count}), pure=False))",
            )
        )

    rng = np.random.default_rng()

    def one_numpy() -> float:
        arr = rng.random(NUMPY_BYTES // 8)  # fresh data every repetition, and pure=False
        start = time.perf_counter()
        client.submit(np.sum, arr, pure=False).result(timeout=120)
        return time.perf_counter() - start

    with rec.row("numpy") as row:
        samples = repeat(one_numpy, cfg["numpy_reps"], warmup=1, budget_s=budget)
        row.update(
            seconds_row(
                samples,
                planned=cfg["numpy_reps"],
                detail="client.submit(np.sum, arr, pure=False).result(), "
                "arr = fresh 100 MiB float64",
            )
        )

    with rec.row("dask_sum") as row:
        samples = repeat(
            lambda: dask_sum(scheduler=client), cfg["sum_reps"], warmup=1, budget_s=budget
        )
        row.update(
            seconds_row(
                samples,
                planned=cfg["sum_reps"],
                detail=sum_detail + ", scheduler=client (2 workers x 1 thread)",
            )
        )


if __name__ == "__main__":
    main()
