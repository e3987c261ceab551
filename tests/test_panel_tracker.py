"""The panel's task memory (``TaskTracker``) with a real client on a real gateway: groups by key
prefix, counts endings, stays cheap for big maps, and counts a task whose future nobody holds
any more as cancelled (the client released it).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Gateway
from helpers import wait_for

from notebook_ext import Client
from notebook_ext.panel import TaskTracker


@pytest.fixture
def tracked(gateway: Gateway, client_home: Path) -> Iterator[tuple[Client, TaskTracker]]:
    with Client(gateway.url, home=client_home, stream_output=False) as c:
        yield c, TaskTracker.attach(c)


def view(tracker: TaskTracker, name: str):
    return next((v for v in tracker.views() if v.name == name), None)


def test_a_map_is_one_group_counted_to_the_end(tracked) -> None:
    client, tracker = tracked
    futures = client.map(abs, range(-1000, 0))
    started = time.perf_counter()
    first = view(tracker, "abs")
    assert time.perf_counter() - started < 1.0  # a refresh never walks the whole map
    assert first is not None and first.total == 1000
    done = wait_for(lambda: (v := view(tracker, "abs")) and v.finished == 1000 and v, 60,
                    "the tracker to count 1,000 finished", interval=0.1)
    assert done.status == "done" and not done.active and done.failed == 0
    assert client.gather(futures)[:2] == [1000, 999]
    assert tracker.submitted == 1000 and TaskTracker.attach(client) is tracker


def test_a_future_nobody_holds_counts_as_cancelled(tracked) -> None:
    client, tracker = tracked
    futures = client.map(time.sleep, [30, 30])
    wait_for(lambda: view(tracker, "sleep") is not None, 5, "the sleep group")
    del futures
    gc.collect()
    v = wait_for(lambda: (v := view(tracker, "sleep")) and v.cancelled == 2 and v, 10,
                 "the dropped futures counted as cancelled", interval=0.1)
    assert v.status == "cancelled" and tracker.unfinished("sleep") == []
