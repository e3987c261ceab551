"""Issue 3, acceptance 6: load. 20 clients x 250 tasks each over 4 providers, nothing lost.

Each client is a separate identity (its own ``DECOMPUTE_HOME``) driven from its own thread, as 20
notebooks would be; each submits its tasks one ``submit`` at a time, as a loop in a cell does.
Latency is submit -> result arrival per task; it is printed, not asserted, because on a shared
2-core machine it says more about the machine than about the code.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, http_get, start_gateway

from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLIENTS = 20
TASKS_PER_CLIENT = 250
PROVIDERS = 4
RESULT_TIMEOUT = 120


def work(client: int, task: int) -> tuple[int, int]:
    """A trivial task that says which process ran it."""
    import os

    return client * 100_000 + task, os.getpid()


@pytest.fixture(scope="module")
def load_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("load"), local_providers=PROVIDERS)
    yield gw
    gw.stop()


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@pytest.mark.timeout(300)
def test_20_clients_x_250_tasks_over_4_providers(load_gateway: Gateway, tmp_path: Path) -> None:
    gw = load_gateway
    latencies: list[float] = []  # list.append is atomic: callbacks run on 20 client loops
    pids: set[int] = set()
    failures: list[str] = []
    clients: list[Client] = []
    connected = threading.Barrier(CLIENTS + 1, timeout=120)
    finished = threading.Barrier(CLIENTS + 1, timeout=RESULT_TIMEOUT * 2)

    def one_client(i: int) -> None:
        try:
            with Client(gw.url, home=tmp_path / f"client-{i}", stream_output=False) as c:
                clients.append(c)
                connected.wait()
                futures = []
                for j in range(TASKS_PER_CLIENT):
                    sent = time.perf_counter()
                    fut = c.submit(work, i, j)
                    fut.add_done_callback(
                        lambda _, sent=sent: latencies.append(time.perf_counter() - sent))
                    futures.append(fut)
                for j, fut in enumerate(futures):
                    value, pid = fut.result(RESULT_TIMEOUT)
                    pids.add(pid)
                    if value != i * 100_000 + j:
                        failures.append(f"client {i} task {j}: got {value}")
                finished.wait()
        except BaseException as exc:  # reported by the test thread
            failures.append(f"client {i}: {exc!r}")
            connected.abort()
            finished.abort()

    threads = [threading.Thread(target=one_client, args=(i,), name=f"load-client-{i}")
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    connected.wait()
    assert len({c.account for c in clients}) == CLIENTS  # 20 identities
    providers = clients[0].providers()
    assert len(providers) == PROVIDERS
    assert {info.cpus for info in providers} == {max(1, (os.cpu_count() or 1) // PROVIDERS)}
    started = time.perf_counter()
    finished.wait()
    elapsed = time.perf_counter() - started
    for t in threads:
        t.join(30)

    assert not failures, failures[:10]
    total = CLIENTS * TASKS_PER_CLIENT
    assert len(latencies) == total  # every future resolved exactly once
    health = gw.health()
    assert health["tasks"] == {"pending": 0, "running": 0}  # nothing left behind
    status, text = http_get(gw.port, "/metrics")
    assert status == 200
    done = re.search(r'^decompute_tasks_completed_total\{status="finished"\} (\S+)$', text, re.M)
    assert done is not None and float(done.group(1)) >= total

    latencies.sort()
    print(f"\nload: {CLIENTS} clients x {TASKS_PER_CLIENT} tasks over {PROVIDERS} providers "
          f"({', '.join(f'{p.name}: {p.cpus} cpu' for p in providers)}): {total} tasks in "
          f"{elapsed:.1f} s ({total / elapsed:.0f} tasks/s), {len(pids)} task processes")
    print(f"latency submit->result: p50 {percentile(latencies, 0.50) * 1e3:.0f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1e3:.0f} ms, "
          f"mean {statistics.fmean(latencies) * 1e3:.0f} ms, max {latencies[-1] * 1e3:.0f} ms")
