"""Frames on the wire: however many parts a frame has, the peer's websockets accepts it.

websockets refuses a message of more than 4,096 fragments (close 1009, "too many fragments").
A chunked ``map`` frame holds one part per item, so a 100,000-item map once cycled through
reconnects forever: found by the soak run, kept here at unit and at end-to-end size.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import start_gateway

from gateway.transport import FRAGMENT_BYTES, fragments
from notebook_ext import Client


def inc(x: int) -> int:
    return x + 1


def test_many_tiny_parts_travel_in_few_fragments_and_arrive_intact() -> None:
    parts = [bytes([i % 251]) * (i % 7 + 1) for i in range(300_000)]
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    frame = [b"header", *parts[:150_000], big, *parts[150_000:]]
    out = fragments(frame)
    assert len(out) < 64
    assert all(f.nbytes <= FRAGMENT_BYTES for f in out)
    assert b"".join(out) == b"".join(frame)
    views = [f for f in out if f.nbytes == FRAGMENT_BYTES and f.obj is big]
    assert views  # a large part goes out as views of itself, not copied


def test_a_map_of_30_000_items_in_large_chunks_completes(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "gw", local_providers=2)
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            started = time.monotonic()
            futs = client.map(inc, range(30_000), chunksize=256)
            assert client.gather(futs) == list(range(1, 30_001))
            assert time.monotonic() - started < 120
            assert client.status == "connected"
    finally:
        gw.stop()
