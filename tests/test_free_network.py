"""Issue 10, acceptance 1 (money part): the embedded network needs no tokens at all.

``decompute-gateway --local-providers 2`` with no other flag (no ``--faucet``): its providers are
free, so tasks that can only land on them hold no escrow and write nothing to the ledger; a fresh
``Client`` (balance 0) maps 100,000 tasks, computes a Dask graph, and a real kernel runs a
``%%decompute`` cell.

`make test` maps 10,000 (the money path is the same per task); `make soak` runs the acceptance's
100,000 (about 70 s here), which adds only time, bound by the providers' throughput.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, start_gateway
from kernel_fixtures import Kernel
from money_audit import books_settle

from gateway.ledger import Ledger
from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks are defined here


def inc(x: int) -> int:
    return x + 1


@pytest.fixture(scope="module")
def free_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # conftest passes --faucet 1000; the later "--faucet 0" wins: no faucet, as a newcomer runs it
    gw = start_gateway(tmp_path_factory.mktemp("free"), local_providers=2,
                       extra=("--faucet", "0"))
    yield gw
    gw.stop()


def ledger_of(gw: Gateway) -> Path:
    return gw.home.parent / "ledger.sqlite"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("n", [10_000, pytest.param(100_000, marks=pytest.mark.soak)])
def test_a_fresh_client_maps_100k_tasks_with_no_tokens(free_gw: Gateway, tmp_path: Path,
                                                        n: int) -> None:
    with Client(free_gw.url, home=tmp_path / "client", stream_output=False) as client:
        assert client.balance() == 0 and client.balance().held == 0
        t0 = time.monotonic()
        futs = client.map(inc, range(n))
        results = client.gather(futs)
        took = time.monotonic() - t0
        print(f"\n{n} free tasks in {took:.1f} s ({n / took:.0f} tasks/s)")
        assert results == list(range(1, n + 1))
        assert {f.cost for f in futs} == {0.0}
        assert client.balance() == 0
        with Ledger(ledger_of(free_gw)) as led:
            assert led.open_escrows() == {}
            assert led.history(client.account) == []  # nothing at all was written for it
    books_settle(ledger_of(free_gw))


def test_a_dask_graph_computes_with_no_tokens(free_gw: Gateway, tmp_path: Path) -> None:
    da = pytest.importorskip("dask.array")
    with Client(free_gw.url, home=tmp_path / "client", stream_output=False) as client:
        x = da.arange(10_000, chunks=500)
        assert int((x * 2).sum().compute(scheduler=client)) == 2 * sum(range(10_000))
        assert client.balance() == 0
    books_settle(ledger_of(free_gw))


def test_a_decompute_cell_runs_with_no_tokens(free_gw: Gateway, tmp_path: Path) -> None:
    kernel = Kernel(dict(os.environ, DECOMPUTE_GATEWAY=free_gw.url,
                         DECOMPUTE_HOME=str(tmp_path / "kernel-home")), tmp_path)
    try:
        kernel.run("data = list(range(10))")
        ex = kernel.run("%%decompute\nprint('on a provider')\ntotal = sum(data) * 2\ntotal")
        assert "on a provider" in ex.stream() and ex.result is not None and "90" in ex.result
        assert kernel.json("import json; print(json.dumps(total))") == 90
        assert kernel.json("import json, notebook_ext.magics as m\n"
                           "print(json.dumps(m.get_client().balance().available))") == 0
    finally:
        kernel.shutdown()
    books_settle(ledger_of(free_gw))
