"""Dask's own conformance suite for ``get`` functions, run against ``client.get`` (issue 10,
acceptance 9), and a 100,000-task graph computed on the network.

Why the 10,000-task chain used to fail with ``task "x10000" depends on '"x9999"', which this
session does not have``: every graph task held the default escrow (1 token) even on free
providers, so with ``--faucet 1000`` the chain's ~1,000th task was refused for funds and every
later one was refused because its input never existed; only the last key's refusal reached the
user. Free tasks now hold no escrow (the gateway), and releases of the thousands of intermediate
futures a graph drops go out batched (the client), not one rate-limited message each.

``dask.utils_test.GetFunctionTestMixin`` is what Dask offers foreign schedulers to prove they
honour the ``get`` contract (nested key lists, bad keys, HighLevelGraphs, a 10,000-task chain).
It runs unchanged against the session's real gateway and providers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import pytest
from conftest import start_gateway
from dask.utils_test import GetFunctionTestMixin

from notebook_ext import Client, InsufficientFunds

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def _bind(request: pytest.FixtureRequest, client: Client) -> None:
    if request.instance is not None:
        request.instance.get = client.get


class TestClientGet(GetFunctionTestMixin):
    """Every test of Dask's mixin, ``get`` being the session client's."""


def inc(x: int) -> int:
    return x + 1


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_a_100_000_task_graph_computes_correctly(client: Client) -> None:
    """100,501 tasks: 50,000 increments, 50,000 more on their results, 500 partial sums of
    100 each (their inputs spread over the providers) and the total. Its time is set by the
    gateway's throughput on a wide graph: the client lowers and sends it in ~10-20 s."""
    n, group = 50_000, 100
    dsk: dict = {}
    for i in range(n):
        dsk[("x", i)] = (inc, i)
        dsk[("y", i)] = (inc, ("x", i))
    for g in range(n // group):
        dsk[("s", g)] = (sum, [("y", i) for i in range(g * group, (g + 1) * group)])
    dsk["total"] = (sum, [("s", g) for g in range(n // group)])
    assert len(dsk) > 100_000
    assert client.get(dsk, "total") == sum(i + 2 for i in range(n))


def test_a_graph_that_outruns_its_funds_says_so_not_that_a_key_is_missing(
        tmp_path: Path) -> None:
    """The root cause of the old failure, on purpose: 5 tokens, priced providers, 1 token of
    escrow per task, a 20-task chain. Whether the gateway holds escrow at submit (then the 6th
    task is refused for funds and the rest for a missing input) or at dispatch, the user hears
    ``InsufficientFunds`` or gets the value, never a missing-key ``KeyError``."""
    gw = start_gateway(tmp_path, local_providers=1,
                       extra=("--faucet", "5", "--local-price-cpu", "0.5"))
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            dsk: dict = {"x0": 0, **{f"x{i + 1}": (inc, f"x{i}") for i in range(20)}}
            try:
                assert c.get(dsk, "x20") == 20
            except InsufficientFunds as exc:
                assert "does not have" not in str(exc)
    finally:
        gw.stop()
