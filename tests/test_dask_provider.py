"""A provider in front of a Dask cluster: :class:`provider.dask_backend.DaskBackend` directly on a
real ``LocalCluster`` (two worker processes), then end to end through a gateway (acceptance 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import dask.array as da
import numpy as np
import pytest
from conftest import REPO, start_gateway, stop_process, wait_for

from notebook_ext.serialize import dumps_args, dumps_function
from provider.dask_backend import DaskBackend, dask_cluster_resources

distributed = pytest.importorskip("distributed")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def double_with_pid(x):
    return x * 2, os.getpid()


def chatty(x):
    print(f"hello {x}")
    return x


def broken(x):
    raise ValueError(f"bad {x}")


def add_deps(deps, extra):
    return sum(float(np.sum(v)) for v in deps.values()) + extra


CLUSTER = """
import sys
import distributed
if __name__ == "__main__":
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit="1GiB") as lc:
        print(lc.scheduler_address, flush=True)
        sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, set[int]]]:
    """A LocalCluster of two single-thread worker processes, in its own process (so it and
    multiprocessing's helper processes end with it); its address and its workers' pids."""
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the LocalCluster did not start within 60 s"
        address = proc.stdout.readline().decode().strip()
        assert address.startswith("tcp://"), address
        with distributed.Client(address, timeout=30) as client:
            pids = set(client.run(os.getpid).values())
        yield address, pids
    finally:
        proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        stop_process(proc)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _backend(address: str) -> DaskBackend:
    backend = DaskBackend(address)
    await backend.start()
    return backend


async def _run(backend: DaskBackend, fn, *args, deps=None, **kwargs):
    func_hash, blob = dumps_function(fn)
    payload = [memoryview(b) for b in dumps_args(args, kwargs)]
    out: list[tuple[str, str]] = []
    slot = await backend.acquire("acct")
    try:
        outcome = await backend.run(slot, f"s/{fn.__name__}", func_hash, memoryview(blob),
                                    payload, lambda s, t: out.append((s, t)), deps=deps)
    finally:
        await backend.release(slot)
    value = None
    if outcome.status == "finished":
        value = cloudpickle.loads(outcome.buffers[0], buffers=outcome.buffers[1:])
    return outcome, value, out, slot


def _dumps(value) -> list[bytes]:
    import pickle

    oob: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=oob.append)
    return [data, *(bytes(b.raw()) for b in oob)]


def test_cluster_resources_are_what_the_provider_advertises(cluster):
    address, _ = cluster
    cores, memory = dask_cluster_resources(address)
    assert cores == 2 and memory == 2 * 2**30
    with pytest.raises(OSError):
        dask_cluster_resources("tcp://127.0.0.1:9", timeout=1)


def test_tasks_run_in_the_cluster_workers(cluster):
    address, pids = cluster

    async def scenario():
        backend = await _backend(address)
        try:
            assert len(backend.workers) == 2
            results = await asyncio.gather(*(_run(backend, double_with_pid, i) for i in range(6)))
            big = np.arange(400_000, dtype="float64")  # 3.2 MB: scattered, not in the graph
            summed = await _run(backend, np.sum, big)
            return results, summed
        finally:
            await backend.close()

    results, (outcome, total, _, _) = run(scenario())
    assert [v[0] for _, v, _, _ in results] == [0, 2, 4, 6, 8, 10]
    assert {v[1] for _, v, _, _ in results} <= pids  # the cluster's processes, not ours
    assert all(o.usage["wall_seconds"] >= o.usage["cpu_seconds"] for o, _, _, _ in results)
    assert outcome.status == "finished" and total == np.arange(400_000).sum()


def test_errors_output_and_graph_dependencies(cluster):
    address, _ = cluster

    async def scenario():
        backend = await _backend(address)
        try:
            return (await _run(backend, broken, 3), await _run(backend, chatty, 5),
                    await _run(backend, add_deps, 1,  # 2.4 MB of inputs: scattered
                               deps=[("sess/a", _dumps(10)),
                                     ("sess/b", _dumps(np.full(300_000, 2.0)))]))
        finally:
            await backend.close()

    (failed, _, _, _), (_, said, out, _), (_, summed, _, _) = run(scenario())
    assert failed.status == "error" and failed.error["type"] == "ValueError"
    assert failed.error["message"] == "bad 3" and "broken" in failed.error["traceback"]
    assert "execute_blob" not in failed.error["traceback"]
    assert said == 5 and out == [("stdout", "hello 5\n")]
    assert summed == 10 + 600_000 + 1


def test_a_killed_task_frees_its_slot(cluster):
    address, _ = cluster

    async def scenario():
        backend = await _backend(address)
        try:
            slot = await backend.acquire("acct")
            func_hash, blob = dumps_function(time.sleep)
            running = asyncio.ensure_future(backend.run(
                slot, "s/nap", func_hash, memoryview(blob),
                [memoryview(b) for b in dumps_args((0.5,), {})], lambda s, t: None))
            async with asyncio.timeout(10):
                while slot.future is None:  # submitted to the cluster
                    await asyncio.sleep(0.01)
            running.cancel()
            await backend.kill(slot)
            await backend.release(slot, broken=True)
            return await _run(backend, double_with_pid, 4)
        finally:
            await backend.close()

    outcome, value, _, _ = run(scenario())
    assert outcome.status == "finished" and value[0] == 8


# --------------------------------------------------------------------------- end to end

_WIRED = "--dask-scheduler is not available" not in (REPO / "provider/__main__.py").read_text()


@pytest.mark.skipif(not _WIRED, reason="provider/__main__.py does not wire --dask-scheduler yet")
def test_a_graph_runs_on_the_cluster_behind_one_provider(cluster, tmp_path: Path):
    """Acceptance 5: one provider started with --dask-scheduler; the graph runs on the cluster."""
    from notebook_ext import Client

    address, pids = cluster
    gw = start_gateway(tmp_path / "gw")
    env = dict(os.environ, DECOMPUTE_HOME=str(tmp_path / "provider"), PYTHONUNBUFFERED="1")
    log = tmp_path / "provider.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "provider", gw.url, "--name", "dask",
                                 "--dask-scheduler", address], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        gw.wait_providers(1, timeout=60)
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            (info,) = client.providers()
            assert info.cpus == 2 and info.sandbox == "weak"
            x = da.arange(1000, chunks=100)
            xp = client.persist(x * 3)
            assert int(client.compute(xp.sum()).result(60)) == 3 * 499500
            ran_in = set(client.gather(client.map(lambda _: os.getpid(), range(4))))
            assert ran_in <= pids
    finally:
        stop_process(proc)
        gw.stop()
    wait_for(lambda: proc.poll() is not None, 10, message="provider exit")
