"""``provider/outbox.py``: whatever a task prints or returns, what the provider sends stays within
every limit the gateway checks on receive (checked here by decoding each frame as it would)."""

from __future__ import annotations

from gateway import protocol as p
from provider.outbox import (
    EVENT_TEXT_BYTES,
    TaskOutput,
    data_frames,
    event_frames,
    heartbeat_frames,
    result_frames,
    result_too_big,
    truncation_line,
)


def decoded(frame: p.Frame) -> tuple[p.Message, list[memoryview]]:
    data = frame if isinstance(frame, bytes) else b"".join(bytes(b) for b in frame)
    return p.decode(data)  # the gateway's own decoder and limits


def test_output_is_capped_chunked_and_marked_once() -> None:
    out = TaskOutput(limit=100_000)
    out.add("stdout", "a" * 70_000)
    out.add("stdout", "b" * 70_000)
    out.add("stderr", "c" * 10)
    chunks = out.close()
    assert "".join(t for s, t in chunks if s == "stdout") == "a" * 70_000 + "b" * 30_000
    # one line, in the stream where text was last dropped
    assert "".join(t for s, t in chunks if s == "stderr") == truncation_line(40_010)
    assert all(len(t.encode()) <= EVENT_TEXT_BYTES for _, t in chunks)


def test_chunks_never_split_a_character() -> None:
    out = TaskOutput(limit=10**6)
    out.add("stdout", "é" * 100_000)  # 2 bytes each: chunk edges fall mid-character if careless
    chunks = out.take()
    assert "".join(t for _, t in chunks) == "é" * 100_000
    assert len(chunks) == 4


def test_event_frames_respect_batch_and_header_limits() -> None:
    events = [p.Event(key=f"t/{i}", kind="output", stream="stdout", text="x" * EVENT_TEXT_BYTES)
              for i in range(300)]
    frames = list(event_frames(events))
    got = [e for f in frames for e in decoded(f)[0].events]
    assert got == events and len(frames) > 2


def test_result_frames_split_by_buffers_and_size() -> None:
    results = [(p.Result(key=f"k{i}", status="finished", nb=2), [b"a" * 100, b"b"])
               for i in range(40_000)]
    frames = list(result_frames(results, max_message=2**30))
    keys = [r.key for f in frames for r in decoded(f)[0].results]
    assert keys == [f"k{i}" for i in range(40_000)]
    assert result_too_big([memoryview(b"x" * 10)], max_message=2**20) is None
    assert "accepts messages of at most" in result_too_big([memoryview(b"x" * 7 * 2**20)],
                                                           max_message=2**23)


def test_heartbeats_and_data_split_too() -> None:
    usage = {f"s/{'k' * 250}{i}": {"cpu_seconds": 1.0} for i in range(5_000)}
    frames = list(heartbeat_frames({"cpu": 1.0}, usage))
    assert {k for f in frames for k in decoded(f)[0].usage} == set(usage)
    have = [(f"d{i}", [b"x" * 1000]) for i in range(3_000)] + [("huge", [b"y" * 2**23])]
    got, missing = [], []
    for frame in data_frames(have, ["gone"], max_message=2**23):
        msg, _ = decoded(frame)
        got += msg.keys
        missing += msg.missing
    assert got == [f"d{i}" for i in range(3_000)] and sorted(missing) == ["gone", "huge"]
