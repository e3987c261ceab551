"""The provider's end of the worker channel (``provider/channel.py``), with no task process: a
socket pair whose far end the test writes, as a hostile task would."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from gateway.protocol import encode_frame
from provider.channel import (
    ChannelClosed,
    ChannelError,
    Done,
    Failed,
    Output,
    parse_reply,
    read_frame,
    sanitize_error,
)


def read(data: bytes, *, close: bool = False, stall: float = 0.3, max_bytes: int = 2**20):
    async def main():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.sendall(data)
        if close:
            theirs.close()
        try:
            return await read_frame(ours, max_bytes=max_bytes, stall=stall)
        finally:
            ours.close()
            if not close:
                theirs.close()

    return asyncio.run(main())


def framed(header: dict, buffers=()) -> bytes:
    body = encode_frame(header, list(buffers))
    return struct.pack("!Q", len(body)) + body


def test_a_sound_frame_reads() -> None:
    header, buffers = read(framed({"t": "done", "key": "k"}, [b"abc"]))
    assert header == {"t": "done", "key": "k"} and [bytes(b) for b in buffers] == [b"abc"]


def test_a_lying_length_prefix_is_refused_before_anything_is_allocated() -> None:
    with pytest.raises(ChannelError, match="announced a 4611686018427387904-byte message"):
        read(struct.pack("!Q", 2**62))


def test_junk_is_a_channel_error() -> None:
    with pytest.raises(ChannelError, match="malformed message"):
        read(struct.pack("!Q", 16) + b"\xff" * 16)


def test_a_half_frame_then_silence_stalls_out() -> None:
    with pytest.raises(ChannelError, match="sent 10 of a 100-byte message and then nothing"):
        read(struct.pack("!Q", 100) + b"x" * 10, stall=0.2)


def test_a_closed_channel_is_said_so() -> None:
    with pytest.raises(ChannelClosed, match="closed its channel 10 bytes into a 100-byte"):
        read(struct.pack("!Q", 100) + b"x" * 10, close=True)
    with pytest.raises(ChannelClosed, match="closed its channel to the provider"):
        read(b"", close=True)


def test_a_large_frame_grows_as_it_arrives() -> None:
    async def main():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        data = framed({"t": "done", "key": "k"}, [b"z" * 3_000_000])
        sender = asyncio.get_running_loop().run_in_executor(None, theirs.sendall, data)
        header, buffers = await read_frame(ours, max_bytes=2**23, stall=5)
        await sender
        ours.close()
        theirs.close()
        return buffers

    assert bytes(asyncio.run(main())[0]) == b"z" * 3_000_000


def test_replies_are_typed_and_checked() -> None:
    assert parse_reply({"t": "out", "stream": "stderr", "text": "hi"}, [], "k") == \
        Output("stderr", "hi")
    assert parse_reply({"t": "done", "key": "k", "dropped": 3}, [], "k") == Done([], 3)
    failed = parse_reply({"t": "fail", "key": "k", "error": {"type": "E", "module": "m",
                                                             "message": "x"}}, [], "k")
    assert isinstance(failed, Failed) and failed.error["traceback"] == ""
    for header, why in [
        ({"t": "ready"}, "unexpected message type"),
        ({"t": "out", "stream": "stdin", "text": "x"}, "malformed output"),
        ({"t": "done", "key": "other"}, "another task"),
        ({"t": "done", "key": "k", "dropped": -1}, "output count"),
        ({"t": "fail", "key": "k", "error": "boom"}, "without an error description"),
        ({"t": "fail", "key": "k", "error": {"type": 5}}, "type is not text"),
    ]:
        with pytest.raises(ChannelError, match=why):
            parse_reply(header, [], "k")


def test_an_error_is_cut_to_what_a_result_may_carry() -> None:
    error = sanitize_error({"type": "T" * 1000, "module": "", "message": "m" * 500_000,
                            "traceback": "t" * 500_000})
    assert len(error["type"]) == 256 and len(error["message"]) < 101_000
    assert error["traceback"].startswith("[...]")
