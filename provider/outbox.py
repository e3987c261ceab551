"""What the provider sends, cut to the limits the gateway checks when it receives.

A frame the gateway refuses ends the provider's connection, so every limit of
:mod:`gateway.schema` (events per frame, text per field, header bytes, buffers per frame) and the
gateway's message size is respected here, on send, whatever a task printed or returned.

Task output is the hostile part: a task may print gigabytes, one huge line or millions of tiny
ones. :class:`TaskOutput` keeps at most ``limit`` bytes of it per task, cut into events of at most
:data:`EVENT_TEXT_BYTES`, and marks what it dropped with one line at the end. Nothing here knows a
socket: it turns messages into lists of frames.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from gateway import protocol as p

#: Text of one output event, in UTF-8 bytes (a chunk never splits a character).
EVENT_TEXT_BYTES = 64 * 1024
#: Events in one ``Events`` frame.
EVENTS_PER_FRAME = 256
#: Output text in one frame, in bytes: headers are capped at ``MAX_HEADER_BYTES`` (4 MiB) on
#: receive, and 256 full events would be 16 MiB.
FRAME_TEXT_BYTES = 3 * 1024 * 1024
#: Output kept per task by default (``Provider(output_limit=...)``, ``--output-limit``).
OUTPUT_LIMIT = 1024 * 1024
#: Header bytes one frame of results or heartbeats may take (under ``MAX_HEADER_BYTES``).
HEADER_BUDGET = 3 * 1024 * 1024
#: Room kept below the gateway's message size for a frame's header.
HEADER_ROOM = 4 * 1024 * 1024
#: Heartbeat usage entries per frame (keys of up to 256 characters plus five numbers each).
USAGE_PER_FRAME = 2_000


def payload_room(max_message: int) -> int:
    """Buffer bytes one frame may carry, leaving room for its header."""
    return max_message - min(HEADER_ROOM, max_message // 4)


def truncation_line(dropped: int) -> str:
    return f"[decompute: output truncated, {dropped} bytes dropped]\n"


def cut_utf8(data: bytes | bytearray, size: int) -> int:
    """The largest cut at or below ``size`` that does not split a UTF-8 character."""
    if size >= len(data):
        return len(data)
    while size > 0 and (data[size] & 0xC0) == 0x80:
        size -= 1
    return size


class TaskOutput:
    """One task's output on its way to the client: capped, chunked, truncation marked once."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.kept = 0  # bytes accepted so far
        self.dropped = 0  # bytes over the limit, dropped here or (as it says) by the worker
        self.marker_stream = "stdout"  # the truncation line goes where text was last dropped
        self._pending: list[tuple[str, bytearray]] = []

    def add(self, stream: str, text: str) -> None:
        data = text.encode("utf-8", "replace")
        room = self.limit - self.kept
        if len(data) > room:
            cut = cut_utf8(data, max(room, 0))
            self.dropped += len(data) - cut
            self.marker_stream = stream
            data = data[:cut]
        if not data:
            return
        self.kept += len(data)
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].extend(data)
        else:
            self._pending.append((stream, bytearray(data)))

    def note_dropped(self, count: int) -> None:
        """Bytes the worker already dropped (its own cap); only ever shown to the task's client."""
        self.dropped += max(0, count)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> list[tuple[str, str]]:
        """What is waiting, as ``(stream, text)`` chunks of at most EVENT_TEXT_BYTES each."""
        chunks: list[tuple[str, str]] = []
        for stream, data in self._pending:
            pos = 0
            while pos < len(data):
                end = pos + cut_utf8(memoryview(data)[pos:], EVENT_TEXT_BYTES)
                if end == pos:  # cannot happen with valid UTF-8; never loop forever
                    end = pos + EVENT_TEXT_BYTES
                chunks.append((stream, data[pos:end].decode("utf-8", "replace")))
                pos = end
        self._pending = []
        return chunks

    def close(self) -> list[tuple[str, str]]:
        """The last chunks, and the truncation line if anything was dropped."""
        chunks = self.take()
        if self.dropped:
            chunks.append((self.marker_stream, truncation_line(self.dropped)))
        return chunks


def event_frames(events: Sequence[p.Event]) -> Iterator[bytes]:
    """``Events`` frames of at most EVENTS_PER_FRAME events and FRAME_TEXT_BYTES of text."""
    batch: list[p.Event] = []
    text = 0
    for event in events:
        size = len(event.text.encode("utf-8", "replace")) if event.text else 0
        if batch and (len(batch) >= EVENTS_PER_FRAME or text + size > FRAME_TEXT_BYTES):
            yield p.encode(p.Events(events=batch))
            batch, text = [], 0
        batch.append(event)
        text += size
    if batch:
        yield p.encode(p.Events(events=batch))


def _result_header_bytes(result: p.Result) -> int:
    """An upper estimate of a result's share of a frame header (text dominates)."""
    size = 512 + len(result.key) * 4
    if result.error is not None:
        err = result.error
        size += 4 * (len(err.type) + len(err.module) + len(err.message) + len(err.traceback))
    return size


def result_frames(results: Sequence[tuple[p.Result, Sequence[memoryview]]],
                  max_message: int) -> Iterator[p.Frame]:
    """``Results`` frames within the batch, buffer, header and message-size limits.

    A single result larger than ``max_message`` must have been refused before (see
    :func:`result_too_big`); it still goes alone in its frame rather than being lost silently.
    """
    batch: list[tuple[p.Result, Sequence[memoryview]]] = []
    header = nbuf = nbytes = 0
    for item in results:
        result, bufs = item
        h = _result_header_bytes(result)
        b = sum(memoryview(x).nbytes for x in bufs)
        if batch and (len(batch) >= p.MAX_BATCH or header + h > HEADER_BUDGET
                      or nbuf + len(bufs) > p.MAX_BUFFERS
                      or nbytes + b > payload_room(max_message)):
            yield _results_frame(batch)
            batch, header, nbuf, nbytes = [], 0, 0, 0
        batch.append(item)
        header, nbuf, nbytes = header + h, nbuf + len(bufs), nbytes + b
    if batch:
        yield _results_frame(batch)


def _results_frame(batch: list[tuple[p.Result, Sequence[memoryview]]]) -> p.Frame:
    return p.encode_parts(p.Results(results=[r for r, _ in batch]),
                          [b for _, bufs in batch for b in bufs])


def result_too_big(buffers: Sequence[memoryview], max_message: int) -> str | None:
    """Why a result cannot travel in one message to the gateway, in words the user can act on."""
    size = sum(memoryview(b).nbytes for b in buffers)
    if len(buffers) > p.MAX_BUFFERS:
        return (f"the result has {len(buffers)} out-of-band buffers; a message carries at most "
                f"{p.MAX_BUFFERS}: return fewer separate arrays (e.g. stack them)")
    if size > payload_room(max_message):
        return (f"the result is {size} bytes; the gateway accepts messages of at most "
                f"{payload_room(max_message)} bytes for a result: return less, or keep it on "
                f"the provider (Dask persist) and reduce it there")
    return None


def data_frames(have: Sequence[tuple[str, Sequence[bytes]]], missing: Sequence[str],
                max_message: int) -> Iterator[p.Frame]:
    """``Data`` frames answering one fetch, each within the key, buffer and size limits. A kept
    result too large for any message is reported missing (the gateway recomputes or fails it)."""
    missing = list(missing)
    batch: list[tuple[str, Sequence[bytes]]] = []
    nbuf = nbytes = 0
    room = payload_room(max_message)
    for key, bufs in have:
        size = sum(memoryview(b).nbytes for b in bufs)
        if size > room or len(bufs) > p.MAX_BUFFERS:
            missing.append(key)
            continue
        if batch and (len(batch) >= USAGE_PER_FRAME or nbuf + len(bufs) > p.MAX_BUFFERS
                      or nbytes + size > room):
            yield _data_frame(batch, [])
            batch, nbuf, nbytes = [], 0, 0
        batch.append((key, bufs))
        nbuf, nbytes = nbuf + len(bufs), nbytes + size
    for start in range(0, len(missing), USAGE_PER_FRAME):
        yield _data_frame(batch, missing[start:start + USAGE_PER_FRAME])
        batch = []
    if batch:
        yield _data_frame(batch, [])


def _data_frame(batch: list[tuple[str, Sequence[bytes]]], missing: list[str]) -> p.Frame:
    return p.encode_parts(p.Data(keys=[k for k, _ in batch], nbs=[len(b) for _, b in batch],
                                 missing=missing), [b for _, bufs in batch for b in bufs])


def heartbeat_frames(load: dict[str, float],
                     usage: dict[str, dict[str, float]]) -> Iterator[bytes]:
    """One heartbeat, or several when the provider holds more tasks than one frame may list."""
    items = list(usage.items())
    for start in range(0, max(len(items), 1), USAGE_PER_FRAME):
        yield p.encode(p.Heartbeat(load=load, usage=dict(items[start:start + USAGE_PER_FRAME])))


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    note = f"... [{len(text) - limit} characters cut]"
    return text[:max(0, limit - len(note))] + note
