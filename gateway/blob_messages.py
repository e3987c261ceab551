"""Blob messages: bulk data moved in chunks, cut-through, and the references that name it.

A *blob* is one large buffer (a big argument, a big result, or a scattered object) that travels
apart from the message that needs it, as a stream of ``Chunk`` messages of at most
``CHUNK_BYTES``: the gateway forwards each chunk as it arrives, so it never holds a whole blob,
and a transfer cut off midway is ended by an ``Abort`` instead of a half-sent websocket message.

Blob ids name what they hold: ``s`` + 64 hex digits is the SHA-256 of the bytes (scattered data
and results; whoever relays or receives them from an untrusted party can check them), ``t`` + 32
hex digits a client's own argument (only ever sent by that client). Ids are scoped by account: a
provider stores a blob under ``<account>/<id>`` and one account can never name another's blob.

``refs`` on a task spec, an assignment or a result list ``[position, id, size]``: the buffer at
``position`` of the payload (or result) is that blob; position -1 is a scattered object the task
reads through a ``Scattered`` reference in its arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.schema import (
    MAX_BUFFERS,
    MAX_KEY_LEN,
    Check,
    ErrorCode,
    Message,
    ProtocolError,
    boolean,
    integer,
    list_of,
    string,
)

#: Bytes per chunk a sender cuts a blob into (one websocket message each).
CHUNK_BYTES = 4 * 1024 * 1024
#: Largest chunk accepted: bounds what one message can make a receiver buffer.
MAX_CHUNK = 2 * CHUNK_BYTES
#: Largest blob: a receiver allocates at most this much for one transfer.
MAX_BLOB = 64 * 1024**3
#: Blobs one task may reference.
MAX_REFS = 64
#: Buffers at least this large travel as blobs, not inside their message.
BLOB_MIN = 8 * 1024 * 1024

_ID = re.compile(r"(s[0-9a-f]{64}|t[0-9a-f]{32})\Z")


def is_content_id(blob_id: str) -> bool:
    """Whether the id is the SHA-256 of the bytes (checkable by anyone who relays them)."""
    return blob_id.startswith("s")


def blob_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be a blob id "
                                              f"('s' + 64 hex digits or 't' + 32)")
    return value


def _ref(name: str, value: Any) -> list:
    if not isinstance(value, list) or len(value) != 3:
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be [position, id, size]")
    pos = integer(-1, MAX_BUFFERS)(f"{name}[0]", value[0])
    return [pos, blob_id(f"{name}[1]", value[1]), integer(0, MAX_BLOB)(f"{name}[2]", value[2])]


def ref_list(name: str, value: Any) -> list:
    """A task's (or result's) blob references; positions >= 0 must be distinct."""
    refs = list_of(_ref, MAX_REFS)(name, value)
    positions = [r[0] for r in refs if r[0] >= 0]
    if len(positions) != len(set(positions)):
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} names a position twice")
    return refs


def refs_problem(refs: list, inline: int) -> str | None:
    """Why ``refs`` cannot be spliced into ``inline`` buffers, or None: the blob positions
    must fill gaps of the full buffer list, never point past its end."""
    total = inline + sum(1 for r in refs if r[0] >= 0)
    bad = [r[0] for r in refs if r[0] >= total]
    if bad:
        return f"blob position {bad[0]} is past the {total} buffers"
    return None


def spec_refs_problem(refs: list, nb: int, items: int) -> str | None:
    """A chunk's items name scattered data only (position -1), never a positioned blob."""
    if items and any(r[0] >= 0 for r in refs):
        return "a chunk of a map carries its arguments inline (blob positions are for tasks)"
    return refs_problem(refs, nb)


def splice(inline: list, refs: list, blobs: dict[str, Any]) -> list:
    """The full buffer list: ``inline`` buffers with each positioned blob put in its place."""
    placed = {pos: blobs[bid] for pos, bid, _ in refs if pos >= 0}
    out, it = [], iter(inline)
    for i in range(len(inline) + len(placed)):
        out.append(placed[i] if i in placed else next(it))
    return out


def store_key(account: str, blob: str) -> str:
    """Where a provider keeps ``account``'s blob: ids never cross accounts."""
    return f"{account}/{blob}"


@dataclass(frozen=True, slots=True)
class Want(Message):
    """Gateway -> a blob's source (client or provider): send blob ``blob`` of ``owner`` (a
    provider's store namespace; empty to a client) as transfer ``x``."""

    TYPE: ClassVar[str] = "want"
    x: int
    blob: str
    owner: str = ""
    SCHEMA: ClassVar[dict[str, Check]] = {
        "x": integer(0, 2**62), "blob": blob_id, "owner": string(MAX_KEY_LEN)}


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """One piece of transfer ``x``: bytes ``offset .. offset + len`` of a ``size``-byte blob,
    in the one buffer that follows. Source -> gateway -> destination(s), in order."""

    TYPE: ClassVar[str] = "chunk"
    x: int
    blob: str
    size: int
    offset: int
    owner: str = ""
    SCHEMA: ClassVar[dict[str, Check]] = {
        "x": integer(0, 2**62), "blob": blob_id, "size": integer(0, MAX_BLOB),
        "offset": integer(0, MAX_BLOB), "owner": string(MAX_KEY_LEN)}


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Transfer ``x`` ends unfinished: the source cannot send it, or a party went away.
    A receiver drops what it assembled of it."""

    TYPE: ClassVar[str] = "abort"
    x: int
    reason: str = ""
    SCHEMA: ClassVar[dict[str, Check]] = {"x": integer(0, 2**62), "reason": string(1000)}


def _scatter_entry(name: str, value: Any) -> list:
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be [id, size]")
    bid = blob_id(f"{name}[0]", value[0])
    if not is_content_id(bid):
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r}: scattered data is named by "
                                              f"its hash ('s' + 64 hex digits)")
    return [bid, integer(0, MAX_BLOB)(f"{name}[1]", value[1])]


@dataclass(frozen=True, slots=True)
class Scatter(Message):
    """Client -> gateway: store these blobs (``[id, size]``) on a provider, or on every one
    eligible (``broadcast``). The gateway asks the client for the bytes with ``Want``."""

    TYPE: ClassVar[str] = "scatter"
    blobs: list
    broadcast: bool = False
    SCHEMA: ClassVar[dict[str, Check]] = {
        "blobs": list_of(_scatter_entry, MAX_REFS), "broadcast": boolean}


@dataclass(frozen=True, slots=True)
class Stored(Message):
    """Gateway -> client: where scattered blobs ended up (``holders[i]`` providers hold
    ``blobs[i]``; ``errors[i]`` says why none does, or is empty)."""

    TYPE: ClassVar[str] = "stored"
    blobs: list
    holders: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "blobs": list_of(blob_id, MAX_REFS), "holders": list_of(integer(0, 2**31), MAX_REFS),
        "errors": list_of(string(1000), MAX_REFS)}


@dataclass(frozen=True, slots=True)
class Drop(Message):
    """Client -> gateway: no future names these blobs any more. Gateway -> provider: free
    these store keys."""

    TYPE: ClassVar[str] = "drop"
    blobs: list
    SCHEMA: ClassVar[dict[str, Check]] = {"blobs": list_of(string(2 * MAX_KEY_LEN), 10_000)}


@dataclass(frozen=True, slots=True)
class Evicted(Message):
    """Provider -> gateway: its store let these keys go (it needed the room)."""

    TYPE: ClassVar[str] = "evicted"
    blobs: list
    SCHEMA: ClassVar[dict[str, Check]] = {"blobs": list_of(string(2 * MAX_KEY_LEN), 10_000)}


BLOB_MESSAGES: tuple[type[Message], ...] = (Want, Chunk, Abort, Scatter, Stored, Drop, Evicted)
