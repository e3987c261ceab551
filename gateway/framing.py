"""Frames: the byte layout of one websocket message, below any message type (sans-I/O).

``b"DC" | version u8 | header length u32 | msgpack header | buffer 0 | ...``: building a frame
from a header map and buffers without copying them, measuring it, splitting one back into its
header and zero-copy buffer views, and cutting a flat buffer list into groups. Split out of
:mod:`gateway.protocol` (which re-exports every name here and adds the typed messages on top);
nothing here knows a message type.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Sequence

import msgpack

from gateway.schema import MAX_BUFFERS, MAX_HEADER_BYTES, ErrorCode, ProtocolError

MAGIC = b"DC"
VERSION = 1
_PREFIX = struct.Struct("!2sBI")


Buffer = bytes | bytearray | memoryview


def frame_parts(header: dict, buffers: Sequence[Buffer] = ()) -> list[Buffer]:
    """A frame as ``[prefix + header, *buffers]``: the buffers are not copied."""
    header = dict(header, b=[memoryview(b).nbytes for b in buffers])
    packed = msgpack.packb(header, use_bin_type=True)
    return [_PREFIX.pack(MAGIC, VERSION, len(packed)) + packed, *buffers]


def encode_frame(header: dict, buffers: Sequence[Buffer] = ()) -> bytes:
    """One frame as a single bytes object (buffers are copied once, into the frame)."""
    return b"".join(frame_parts(header, buffers))


#: Below this size a frame is joined into one bytes object (cheaper than several writes).
JOIN_BELOW = 256 * 1024

class Transient(list):
    """A frame of blob traffic (chunks, wants): never kept for a client's reconnect, since the
    transfer it belongs to ends with the connection."""


#: From this size a receive buffer is an anonymous mapping: its pages are zero when first
#: touched, so it costs no up-front fill (a 100 MiB ``bytearray`` is memset first, ~30 ms).
SCRATCH_MAP_FROM = 1024 * 1024


def scratch(n: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``n`` bytes to receive into."""
    return mmap.mmap(-1, n) if n >= SCRATCH_MAP_FROM else bytearray(n)


def transient(frame: bytes | list[Buffer]) -> Transient:
    """``frame`` marked as blob traffic."""
    return Transient([frame] if isinstance(frame, bytes) else frame)


Frame = bytes | list[Buffer]
#: Queue a frame for one peer (the hub and its records never touch a socket).
Send = Callable[[Frame], None]


def frame_size(frame: Frame) -> int:
    return len(frame) if isinstance(frame, bytes) else sum(memoryview(b).nbytes for b in frame)


def header_length(data: Buffer) -> int:
    """The header length a frame's prefix declares (0 if it has none): what decoding costs."""
    view = memoryview(data)
    return _PREFIX.unpack_from(view)[2] if view.nbytes >= _PREFIX.size else 0


def decode_frame(data: Buffer, max_header: int = MAX_HEADER_BYTES) -> tuple[dict, list[memoryview]]:
    """Split a frame into its header map and zero-copy views of its buffers."""
    view = memoryview(data)
    if view.nbytes < _PREFIX.size:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, "not a decompute frame (bad magic)")
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {version}; this side speaks {VERSION}"
        )
    if hlen > max_header or _PREFIX.size + hlen > view.nbytes:
        raise ProtocolError(ErrorCode.TOO_BIG, "header length out of bounds")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size:_PREFIX.size + hlen], raw=False, strict_map_key=True
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(ErrorCode.BAD_FRAME, f"header is not valid msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header is not a map")
    lens = header.pop("b", [])
    if not isinstance(lens, list) or len(lens) > MAX_BUFFERS or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lens
    ):
        raise ProtocolError(ErrorCode.BAD_FRAME, "buffer table is malformed")
    pos = _PREFIX.size + hlen
    if pos + sum(lens) != view.nbytes:
        raise ProtocolError(ErrorCode.BAD_FRAME, "buffer lengths do not add up to the frame")
    buffers = []
    for n in lens:
        buffers.append(view[pos:pos + n])
        pos += n
    return header, buffers


def split_buffers(counts: Sequence[int], buffers: Sequence[memoryview]) -> list[list[memoryview]]:
    """Cut a flat buffer list into consecutive groups of ``counts``; a list that does not add
    up is a bug upstream (decoding checks it), never silently cut short."""
    if sum(counts) != len(buffers):
        raise ValueError(f"headers name {sum(counts)} buffers, {len(buffers)} were given")
    out, pos = [], 0
    for n in counts:
        out.append(list(buffers[pos:pos + n]))
        pos += n
    return out
