"""The provider's end of a worker channel, which it treats as hostile input.

A task runs arbitrary code in the worker process, so it can write anything to the socket the
worker talks on: junk, a length prefix of 2**63, a flood, a half frame, or nothing and then close
it. Everything read here is bounded before it is allocated and checked before it is used; anything
else is a :class:`ChannelError`, which fails that one task (the provider kills its worker).

Frames are ``u64 length | protocol frame`` (:mod:`provider.worker`). Replies are typed:
:class:`Output` (``out``), :class:`Done` (``done``, result buffers) and :class:`Failed`
(``fail``, a structured error, never a pickle).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import (
    MAX_HEADER_BYTES,
    MAX_KEY_LEN,
    Buffer,
    ProtocolError,
    decode_frame,
    frame_size,
)
from provider.shared_memory import MAX_FDS, map_sealed, received_fds, rights
from provider.worker import LENGTH

#: Largest frame a worker may send: a result must fit in one gateway message (512 MiB by
#: default), so nothing bigger is worth reading. The buffer grows as bytes arrive, so a lying
#: prefix costs nothing until the bytes are really sent.
MAX_FRAME_BYTES = 512 * 1024 * 1024 + MAX_HEADER_BYTES
#: Allocated up front for a frame; larger frames grow by doubling as their bytes arrive.
PREALLOC_BYTES = 1024 * 1024
#: Once a frame has begun, its bytes must keep coming: a half frame followed by silence is a
#: broken channel, not a long task.
STALL_SECONDS = 10.0
#: Text kept of a failure's message and traceback (a result header must stay small).
ERROR_TEXT_CHARS = 100_000
#: Parts one ``sendmsg`` may carry (Linux's IOV_MAX is 1024); a frame with more goes part by part.
IOV_MAX = 1024


class ChannelError(Exception):
    """The worker channel broke its protocol; the message says how."""


class ChannelClosed(ChannelError):
    """The worker's end of the channel is gone (the process died or the task closed it)."""


@dataclass(frozen=True, slots=True)
class Output:
    stream: str
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    buffers: list[memoryview]
    dropped: int = 0  # output bytes the worker itself dropped (its own cap)


@dataclass(frozen=True, slots=True)
class Failed:
    error: dict[str, str] = field(default_factory=dict)
    dropped: int = 0


Reply = Output | Done | Failed


async def send_frame(sock: socket.socket, frame: Sequence[Buffer], fds: Sequence[int] = ()
                     ) -> None:
    """Write ``u64 length | frame`` to a worker: one ``sendmsg`` system call when the socket takes
    it all (any frame that fits its buffer, i.e. every small task), no copy of large parts, and
    the event loop's awaited writes only for what did not fit."""
    views = [memoryview(LENGTH.pack(frame_size(frame))),
             *(v for v in (memoryview(part).cast("B") for part in frame) if v.nbytes)]
    sent = 0
    if fds:  # the descriptors ride on the first bytes: that send must happen here
        while True:
            try:
                sent = sock.sendmsg(views[:IOV_MAX], rights(list(fds)))
                break
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(0.001)
    elif len(views) <= IOV_MAX:
        try:
            sent = sock.sendmsg(views)
        except (BlockingIOError, InterruptedError):
            sent = 0
    loop = asyncio.get_running_loop()
    for view in views:
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        await loop.sock_sendall(sock, view[sent:])
        sent = 0


def _recv_now(sock: socket.socket, view: memoryview) -> int | None:
    """Bytes read without waiting, or None when nothing has arrived yet (no timer, no future:
    a worker's reply is usually already there when the provider looks)."""
    try:
        return sock.recv_into(view)
    except (BlockingIOError, InterruptedError):
        return None


async def recv_exactly(sock: socket.socket, n: int, stall: float | None = STALL_SECONDS,
                       first_wait: float | None = None) -> bytearray:
    """``n`` bytes. Waits up to ``first_wait`` (None: forever) for the first, then at most
    ``stall`` seconds between arrivals. Memory grows with what arrived, not with ``n``."""
    loop = asyncio.get_running_loop()
    buf = bytearray(min(n, PREALLOC_BYTES))
    pos = 0
    while pos < n:
        if pos == len(buf):
            buf.extend(bytes(min(n, 2 * len(buf)) - len(buf)))
        wait = first_wait if pos == 0 else stall
        with memoryview(buf) as view:
            try:
                got = _recv_now(sock, view[pos:])
                if got is None:
                    async with asyncio.timeout(wait):
                        got = await loop.sock_recv_into(sock, view[pos:])
            except TimeoutError:
                raise ChannelError(f"the task process sent {pos} of a {n}-byte message and then "
                                   f"nothing for {stall:g} s") from None
            except OSError as exc:
                raise ChannelClosed(f"the channel to the task process failed ({exc})") from None
        if not got:
            if pos:
                raise ChannelClosed(f"the task process closed its channel {pos} bytes into a "
                                    f"{n}-byte message")
            raise ChannelClosed("the task process closed its channel to the provider")
        pos += got
    return buf


async def recv_prefix(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The first bytes of a frame (up to its length prefix) and the descriptors riding on them.
    Waits as long as it takes: the worker answers when its task ends."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(LENGTH.size, socket.CMSG_SPACE(4 * MAX_FDS))
            return data, received_fds(ancdata)
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
        except OSError as exc:
            raise ChannelClosed(f"the channel to the task process failed ({exc})") from None


def _wake(ready: asyncio.Future) -> None:
    if not ready.done():
        ready.set_result(None)


async def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES,
                     stall: float = STALL_SECONDS) -> tuple[dict, list[memoryview]]:
    """One frame: a bounded length prefix, then a body that must be a protocol frame. Big
    buffers may come as sealed memory files (``fds``), checked and mapped, never copied."""
    head, fds = await recv_prefix(sock)
    try:
        if not head:
            raise ChannelClosed("the task process closed its channel to the provider")
        if len(head) < LENGTH.size:
            head += bytes(await recv_exactly(sock, LENGTH.size - len(head), stall=stall))
        header, buffers = await _read_body(sock, LENGTH.unpack(head)[0], max_bytes, stall)
        return header, _mapped(header, buffers, fds, max_bytes)
    finally:
        for fd in fds:  # those not taken over by a mapping
            with contextlib.suppress(OSError):
                os.close(fd)


def _mapped(header: dict, buffers: list, fds: list[int], max_bytes: int) -> list:
    """Put each announced descriptor's mapping in its place (the caller closes the rest)."""
    table = header.pop("fds", None) or []
    if not table and not fds:
        return buffers
    if not isinstance(table, list) or len(table) != len(fds) or not all(
            isinstance(e, list) and len(e) == 2 and all(type(v) is int for v in e)
            and 0 <= e[0] < len(buffers) and 0 <= e[1] <= max_bytes for e in table):
        raise ChannelError("the task process sent descriptors its message does not describe")
    out = list(buffers)
    while fds:
        (index, size), fd = table[len(table) - len(fds)], fds.pop(0)
        try:
            out[index] = memoryview(map_sealed(fd, size))
        except ValueError as exc:
            raise ChannelError(f"the task process sent {exc}") from None
    return out


async def _read_body(sock: socket.socket, n: int, max_bytes: int, stall: float
                     ) -> tuple[dict, list[memoryview]]:
    if n > max_bytes:
        raise ChannelError(f"the task process announced a {n}-byte message; the limit is "
                           f"{max_bytes} bytes")
    body = await recv_exactly(sock, n, stall=stall, first_wait=stall)
    try:
        return decode_frame(body, max_header=MAX_HEADER_BYTES)
    except ProtocolError as exc:
        raise ChannelError(f"the task process sent a malformed message ({exc})") from None


def parse_reply(header: dict, buffers: list[memoryview], key: str) -> Reply:
    """A worker's reply to the task ``key``, typed; anything else raises ChannelError."""
    kind = header.get("t")
    if kind == "out":
        stream, text = header.get("stream"), header.get("text")
        if stream not in ("stdout", "stderr") or not isinstance(text, str) or buffers:
            raise ChannelError("the task process sent a malformed output message")
        return Output(stream, text)
    if kind not in ("done", "fail"):
        raise ChannelError(f"the task process sent an unexpected message type "
                           f"{str(kind)[:40]!r}")
    if header.get("key") != key:
        raise ChannelError("the task process answered for another task")
    dropped = header.get("dropped", 0)
    if not isinstance(dropped, int) or isinstance(dropped, bool) or not 0 <= dropped < 2**53:
        raise ChannelError("the task process sent a malformed output count")
    if kind == "done":
        return Done(buffers, dropped)
    if buffers:
        raise ChannelError("the task process sent buffers with a failure")
    return Failed(sanitize_error(header.get("error")), dropped)


def sanitize_error(error: Any) -> dict[str, str]:
    """A failure as the protocol accepts it: four strings within their limits."""
    if not isinstance(error, dict):
        raise ChannelError("the task process sent a failure without an error description")
    out = {}
    for name, limit in (("type", MAX_KEY_LEN), ("module", MAX_KEY_LEN),
                        ("message", ERROR_TEXT_CHARS), ("traceback", ERROR_TEXT_CHARS)):
        value = error.get(name, "")
        if not isinstance(value, str):
            raise ChannelError(f"the task process sent a failure whose {name} is not text")
        out[name] = value[:limit] if name in ("type", "module") else _tail(value, limit)
    out["type"] = out["type"] or "Exception"
    return out


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]
