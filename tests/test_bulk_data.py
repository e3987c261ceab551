"""Bulk data: cut-through blobs, scatter, and the provider's bounded store (real processes).

The gigabyte runs (a 1 GiB round trip, transfers cut off at 500 MiB) are ``bulk`` tests: they
take tens of seconds and gigabytes of memory, so they run in ``make bulk`` (and ``make bench``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import start_gateway, start_provider
from fakes import FakeClient
from helpers import wait_for

from gateway import protocol as p
from gateway.blob_messages import CHUNK_BYTES
from notebook_ext import Client
from notebook_ext.errors import ProviderLost
from notebook_ext.serialize import dumps_args, dumps_function, local_runtime

MiB = 1024 * 1024


class PeakRss:
    """The highest RSS of a process, sampled every 5 ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def traffic(gw, prefix: str) -> dict[str, dict[str, int]]:
    return {k: v for k, v in gw.health()["traffic"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory):
    gw = start_gateway(tmp_path_factory.mktemp("bulk"), local_providers=2)
    yield gw
    gw.stop()


@pytest.fixture
def client2(two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DECOMPUTE_HOME", str(tmp_path / "client-home"))
    with Client(two.url) as c:
        yield c


def test_a_big_argument_and_result_arrive_intact(client2) -> None:
    a = np.random.default_rng(1).random(3 * MiB)  # 24 MiB: over BLOB_MIN, sent apart
    doubled = client2.submit(lambda x: x * 2, a).result(120)
    assert np.array_equal(doubled, a * 2)
    assert client2.submit(np.sum, a).result(120) == pytest.approx(a.sum())


def test_scattered_data_crosses_each_connection_at_most_once(client2, two) -> None:
    a = np.arange(100 * MiB // 8, dtype=np.float64)
    before = two.health()["traffic"]
    data = client2.scatter(a)
    assert data.result(60) is a and data.holders == 1
    assert client2.scatter(a) is data  # the same object: nothing is sent again
    futures = [client2.submit(lambda d, i: float(d.sum()) + i, data, i) for i in range(20)]
    assert client2.gather(futures) == [float(a.sum()) + i for i in range(20)]
    after = two.health()["traffic"]
    moved = {k: (v["in"] - before.get(k, {"in": 0})["in"],
                 v["out"] - before.get(k, {"out": 0})["out"]) for k, v in after.items()}
    size = 100 * MiB
    mine = [v for k, v in moved.items() if k == f"client:{client2.session}"]
    assert mine and mine[0][0] < 1.1 * size, moved  # from the client: once
    for key, (_, out) in moved.items():
        if key.startswith("provider:"):
            assert out < 1.1 * size, moved  # to each provider: at most once


def test_scatter_works_in_map_and_dask(client2) -> None:
    import dask

    a = np.arange(1000, dtype=np.float64)
    data = client2.scatter(a, broadcast=True)
    assert data.result(60) is a and data.holders == 2
    assert client2.gather(client2.map(lambda d, i: float(d[i]), [data] * 50, range(50))) == \
        [float(i) for i in range(50)]
    total = dask.delayed(np.sum)(data)
    assert dask.compute(total, scheduler=client2)[0] == a.sum()


def test_a_provider_store_stays_within_its_bound(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """3x the store's bound of scattered data streams through one provider while a task that
    needs the first array runs: the store never holds more than its bound, and the running task's
    data is not evicted under it."""
    gw = start_gateway(tmp_path / "gw")
    prov = start_provider(gw, tmp_path, "small", extra=("--store-memory", "64MiB"))
    try:
        gw.wait_providers(1)
        monkeypatch.setenv("DECOMPUTE_HOME", str(tmp_path / "client-home"))
        with Client(gw.url) as client:
            first = np.full(2 * MiB, 1.0)  # 16 MiB
            held = client.scatter(first)
            held.result(60)
            slow = client.submit(_sum_later, held, 3.0)
            wait_for(lambda: slow.status == "running", 30, message="the slow task runs")
            wait_for(lambda: client.providers()[0].load.get("store_limit") == 64 * MiB, 30,
                     message="the provider reports its store")
            peak = 0.0
            arrays = []
            for i in range(12):  # 12 x 16 MiB = 192 MiB through a 64 MiB store
                arrays.append(client.scatter(np.full(2 * MiB, float(i + 2))))
                for f in arrays[-1:]:
                    f.exception(60)
                info = client.providers()[0]
                peak = max(peak, info.load.get("store_bytes", 0.0))
            assert slow.result(60) == float(2 * MiB)
            assert peak <= 64 * MiB
            # what was evicted comes back from the client when a task needs it again
            assert client.submit(np.sum, arrays[0]).result(60) == 2.0 * 2 * MiB
    finally:
        prov.stop()
        gw.stop()


def _sum_later(data, seconds: float) -> float:
    """Hold ``data`` (pinned in the store) for a while, as a long task does, then use it."""

    time.sleep(seconds)
    return float(data.sum())


# --------------------------------------------------------------------------- soak: gigabytes


@pytest.mark.bulk
def test_a_gibibyte_round_trip_keeps_the_gateway_small(client2, two) -> None:
    a = np.ones(1024 * MiB // 8)
    a[::4096] = np.arange(len(a[::4096]))
    idle = rss(two.proc.pid)
    with PeakRss(two.proc.pid) as peak:
        b = client2.submit(lambda x: x + 1, a, timeout=600).result(600)
    assert b.shape == a.shape and b[0] == 1.0 and b[4096] == 2.0 and b[-1] == a[-1] + 1
    del b
    grew = (peak.peak - idle) / MiB
    assert grew < 200, f"the gateway grew by {grew:.0f} MiB during a 1 GiB round trip"


@pytest.mark.bulk
def test_a_client_that_leaves_midway_fails_its_task_and_frees_the_gateway(
        two, tmp_path: Path) -> None:
    size = 500 * MiB
    fn_hash, fn_blob = dumps_function(np.sum)
    stream, _ = dumps_args((np.zeros(size // 8),), {})
    bid = "t" + "5" * 32
    spec = p.TaskSpec(key="half", func=fn_hash, nb=1, runtime=local_runtime(), retries=0,
                      refs=[[1, bid, size]])
    idle = rss(two.proc.pid)
    fake = FakeClient(two.url, tmp_path / "fake").start()
    session, identity = fake.session, fake.identity
    fake.submit([spec], {fn_hash: fn_blob}, [[stream]])
    want = wait_for(lambda: next((m for m in list(fake.other.queue) if isinstance(m, p.Want)),
                                 None), 30, message="the gateway asks for the data")
    piece = b"\0" * CHUNK_BYTES
    for i in range(250):  # half of it, then the client vanishes
        fake.send(p.Chunk(x=want.x, blob=bid, size=size, offset=i * CHUNK_BYTES), [piece])
    wait_for(lambda: two.health()["blobs"]["bytes_moved"] >= 0, 10)
    fake.close()
    back = FakeClient(two.url, tmp_path / "fake", session=session, identity=identity).start()
    try:
        result = back.wait_results(1, 60)[0]
        assert result.status == "error" and "disconnected" in result.error.message, result
    finally:
        back.close()
    wait_for(lambda: rss(two.proc.pid) - idle < 50 * MiB, 30,
             message="the gateway's memory back near idle")


@pytest.mark.bulk
def test_a_provider_that_dies_returning_a_big_result_fails_the_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start_gateway(tmp_path / "gw")
    prov = start_provider(gw, tmp_path, "doomed")
    try:
        gw.wait_providers(1)
        idle = rss(gw.proc.pid)
        monkeypatch.setenv("DECOMPUTE_HOME", str(tmp_path / "client-home"))
        with Client(gw.url) as client:
            fut = client.submit(np.ones, 500 * MiB // 8, retries=0)
            wait_for(lambda: gw.health()["blobs"]["bytes_moved"] > 100 * MiB, 120, interval=0.01,
                     message="the result halfway home")
            prov.sigkill()
            with pytest.raises(ProviderLost, match="lost"):
                fut.result(60)
        wait_for(lambda: rss(gw.proc.pid) - idle < 50 * MiB, 30,
                 message="the gateway's memory back near idle")
    finally:
        prov.stop()
        gw.stop()
