"""The embedded network and the end of a provider's life, as a new user meets them.

``decompute-gateway --local-providers N`` starts N providers that advertise their share of this
machine (not N times the whole of it) and keep their keys under ``DECOMPUTE_HOME``, never in the
current folder. A task whose providers all left fails saying so (``ProviderLost``), after the
gateway waited a grace for one to come back, not with a message about Python runtimes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import REPO, start_gateway
from fakes import FakeProvider

from notebook_ext import Client, ProviderLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def test_local_providers_share_the_machine_and_keep_their_state_under_home(
        tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "gw", local_providers=2)
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            infos = sorted(c.providers(), key=lambda i: i.name)
            assert [i.name for i in infos] == ["local-0", "local-1"]
            share = psutil.virtual_memory().total // 2
            assert [i.memory for i in infos] == [share, share]
            assert c.submit(square, 7).result(60) == 49
        for i in range(2):
            assert (gw.home / "local-providers" / f"local-{i}").is_dir()
        assert not (tmp_path / "gw" / ".decompute-local").exists()
        assert not (REPO / ".decompute-local").exists()
    finally:
        gw.stop()


@pytest.fixture
def quick_gateway(tmp_path: Path):
    """No providers of its own; a task waits 2 s for a provider to come back (4 s with none)."""
    gw = start_gateway(tmp_path / "gw", extra=("--rejoin-grace", "2"))
    yield gw
    gw.stop()


def test_a_task_whose_providers_all_left_says_so(quick_gateway, tmp_path: Path) -> None:
    with Client(quick_gateway.url, home=tmp_path / "client", stream_output=False) as c:
        with FakeProvider(quick_gateway.url, tmp_path / "leaver", name="leaver") as leaver:
            fut = c.submit(square, 3)
            leaver.next_assignment()
        # it left holding the task: the task waits for a provider, then fails saying why
        with pytest.raises(ProviderLost, match="left.*no provider is online") as caught:
            fut.result(30)
        assert "runtime" not in str(caught.value)
