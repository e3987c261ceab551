"""The provider writes a frame to its worker in one system call (``provider.channel.send_frame``)
and reads replies without a timer when they are already there; big frames, many parts and a
slow reader still arrive whole."""

from __future__ import annotations

import asyncio
import socket

from gateway.protocol import frame_parts
from provider.channel import IOV_MAX, read_frame, send_frame


class CountingSocket(socket.socket):
    """A real socket that counts its send system calls."""

    calls = 0

    def sendmsg(self, *args, **kwargs):  # type: ignore[override]
        CountingSocket.calls += 1
        return super().sendmsg(*args, **kwargs)

    def send(self, *args, **kwargs):  # type: ignore[override]
        CountingSocket.calls += 1
        return super().send(*args, **kwargs)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    ours = CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    ours.setblocking(False)
    b.setblocking(False)
    return ours, b


def roundtrip(header: dict, parts: list) -> tuple[dict, list[bytes], int]:
    async def main():
        ours, theirs = pair()
        CountingSocket.calls = 0
        try:
            sending = asyncio.create_task(send_frame(ours, frame_parts(header, parts)))
            got_header, got = await read_frame(theirs, stall=5)
            await sending
            return got_header, [bytes(b) for b in got], CountingSocket.calls
        finally:
            ours.close()
            theirs.close()

    return asyncio.run(main())


def test_a_small_frame_is_one_system_call() -> None:
    header, bufs, calls = roundtrip({"t": "run", "key": "k"}, [b"func", b"", b"args"])
    assert header == {"t": "run", "key": "k"} and bufs == [b"func", b"", b"args"]
    assert calls == 1


def test_a_frame_larger_than_the_socket_buffer_arrives_whole() -> None:
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB: many partial writes
    header, bufs, calls = roundtrip({"t": "run"}, [b"x", memoryview(big), b"tail"])
    assert bufs == [b"x", big, b"tail"] and calls > 1


def test_more_parts_than_one_sendmsg_takes_go_part_by_part() -> None:
    parts = [bytes([i % 256]) * 3 for i in range(IOV_MAX + 10)]
    _, bufs, _ = roundtrip({"t": "run"}, parts)
    assert bufs == parts


def test_replies_already_there_are_read_in_order() -> None:
    async def main():
        ours, theirs = pair()
        try:
            for i in range(3):
                await send_frame(ours, frame_parts({"t": "out", "i": i}, [b"%d" % i]))
            return [await read_frame(theirs) for _ in range(3)]
        finally:
            ours.close()
            theirs.close()

    got = asyncio.run(main())
    assert [(h["i"], bytes(b[0])) for h, b in got] == [(0, b"0"), (1, b"1"), (2, b"2")]
