"""The wire protocol: pure encode/decode/validate, no sockets (sans-I/O).

One binary websocket message is one *frame*::

    b"DC" | version u8 | header length u32 (big-endian) | msgpack header | buffer 0 | ...

The header is a msgpack map with ``"t"`` (message type), the message's fields, and ``"b"``, the
byte lengths of the out-of-band buffers that follow. Buffers carry opaque payloads: cloudpickled
functions, pickle-5 argument streams and their out-of-band array buffers, results. Nobody but the
sandboxed task process (for tasks) and the client's safe decoder (for results) ever unpickles
them; the gateway only parses and validates headers, never a payload.

Every header field is checked against a schema before a message object is built; any failure is a
:class:`ProtocolError` with an :class:`ErrorCode` that the shell turns into a clear close reason.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

MAGIC = b"DC"
VERSION = 1
_PREFIX = struct.Struct("!2sBI")

#: A header is parsed in full before anything else; this bounds that parse to 4 MiB of memory
#: and a few ms of CPU per frame. A batch of 5,000 task headers takes about 600 KiB.
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Out-of-band buffers per frame. Bounds the list the decoder builds from one header.
MAX_BUFFERS = 65_536
#: Tasks (or results, or events) in one batched message. Bounds per-message work on the gateway.
MAX_BATCH = 10_000
#: Task keys, account ids, names: short strings, so indexes and logs stay small.
MAX_KEY_LEN = 256
#: Free-text fields (error messages, tracebacks, streamed output chunks).
MAX_TEXT_LEN = 1024 * 1024


class ErrorCode(StrEnum):
    """Why something was refused. Values travel on the wire and in close reasons."""

    BAD_FRAME = "bad_frame"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA = "schema"
    TOO_BIG = "too_big"
    AUTH = "auth"
    RATE = "rate_limited"
    LIMIT = "limit"
    NO_MATCH = "no_matching_provider"
    FUNDS = "insufficient_funds"
    BUDGET = "budget_exceeded"
    LOST = "provider_lost"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    VERIFY = "verification_failed"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``code`` says which rule."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        super().__init__(message)

    @property
    def reason(self) -> str:
        """A websocket close reason: ``code: message`` cut to the 123 bytes RFC 6455 allows."""
        text = f"{self.code.value}: {self}"
        return text.encode()[:123].decode(errors="ignore")


# --------------------------------------------------------------------------- field checking

Check = Callable[[str, Any], Any]


def _fail(name: str, expected: str, value: Any) -> ProtocolError:
    got = type(value).__name__
    return ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be {expected}, got {got}")


def string(max_len: int = MAX_KEY_LEN) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(name, "a string", value)
        if len(value) > max_len:
            raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} longer than {max_len}")
        return value

    return check


def integer(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(name, "an integer", value)
        if not lo <= value <= hi:
            raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} out of range [{lo}, {hi}]")
        return value

    return check


def number(lo: float = 0.0, hi: float = 1e18) -> Check:
    def check(name: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(name, "a number", value)
        if not lo <= value <= hi:  # also rejects NaN
            raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} out of range [{lo}, {hi}]")
        return float(value)

    return check


def blob(size: int | None = None, max_len: int = 1024) -> Check:
    def check(name: str, value: Any) -> bytes:
        if not isinstance(value, bytes):
            raise _fail(name, "bytes", value)
        if (size is not None and len(value) != size) or len(value) > max_len:
            raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} has the wrong length")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a boolean", value)
    return value


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be one of {choices}")
        return value

    return check


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def list_of(inner: Check, max_len: int = MAX_BATCH) -> Check:
    def check(name: str, value: Any) -> list:
        if not isinstance(value, list):
            raise _fail(name, "a list", value)
        if len(value) > max_len:
            raise ProtocolError(ErrorCode.TOO_BIG, f"field {name!r} has over {max_len} items")
        return [inner(f"{name}[{i}]", v) for i, v in enumerate(value)]

    return check


def mapping(max_len: int = 64, values: Check | None = None) -> Check:
    """A small str-keyed map; values are checked by ``values`` or left as msgpack gave them."""

    def check(name: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise _fail(name, "a map", value)
        if len(value) > max_len:
            raise ProtocolError(ErrorCode.TOO_BIG, f"field {name!r} has over {max_len} entries")
        for k in value:
            if not isinstance(k, str) or len(k) > MAX_KEY_LEN:
                raise _fail(f"{name} key", "a short string", k)
        if values is None:
            return value
        return {k: values(f"{name}.{k}", v) for k, v in value.items()}

    return check


def record(cls: type[Record]) -> Check:
    def check(name: str, value: Any) -> Record:
        if not isinstance(value, dict):
            raise _fail(name, "a map", value)
        return cls.from_wire(value, where=name)

    return check


def anything(name: str, value: Any) -> Any:
    return value


# --------------------------------------------------------------------------- records


class Record:
    """A frozen dataclass whose fields are validated by ``SCHEMA`` when read from the wire."""

    SCHEMA: ClassVar[dict[str, Check]] = {}
    __slots__ = ()

    @classmethod
    def from_wire(cls, data: dict, where: str = "") -> Any:
        unknown = data.keys() - cls.SCHEMA.keys()
        if unknown:
            raise ProtocolError(
                ErrorCode.SCHEMA, f"{where or cls.__name__}: unknown field {next(iter(unknown))!r}"
            )
        kwargs = {}
        for name, required in _field_table(cls):
            if name in data:
                kwargs[name] = cls.SCHEMA[name](f"{where}.{name}" if where else name, data[name])
            elif required:
                raise ProtocolError(ErrorCode.SCHEMA, f"{where or cls.__name__}: missing {name!r}")
        return cls(**kwargs)

    def to_wire(self) -> dict:
        out = {}
        for name, _ in _field_table(type(self)):
            value = getattr(self, name)
            if isinstance(value, Record):
                value = value.to_wire()
            elif isinstance(value, list) and value and isinstance(value[0], Record):
                value = [v.to_wire() for v in value]
            out[name] = value
        return out


_FIELD_TABLES: dict[type, list[tuple[str, bool]]] = {}


def _field_table(cls: type) -> list[tuple[str, bool]]:
    """(name, required) per dataclass field, computed once per class: decode is a hot path."""
    table = _FIELD_TABLES.get(cls)
    if table is None:
        table = [
            (f.name, f.default is MISSING and f.default_factory is MISSING)
            for f in fields(cls)
        ]
        _FIELD_TABLES[cls] = table
    return table


RESOURCE_CHECKS: dict[str, Check] = {
    "cpus": number(0, 4096),
    "memory": integer(0, 2**50),
    "gpus": number(0, 64),
}


def resource_map(name: str, value: Any) -> dict:
    """``{"cpus": 1, "memory": bytes, "gpus": 0}``; unknown resource names are refused."""
    value = mapping(8)(name, value)
    for k, v in value.items():
        if k not in RESOURCE_CHECKS:
            raise ProtocolError(ErrorCode.SCHEMA, f"{name}: unknown resource {k!r}")
        RESOURCE_CHECKS[k](f"{name}.{k}", v)
    return value


@dataclass(frozen=True, slots=True)
class Runtime(Record):
    """What a cloudpickled function needs: Python major.minor and cloudpickle's version."""

    python: str
    cloudpickle: str
    SCHEMA: ClassVar[dict[str, Check]] = {"python": string(16), "cloudpickle": string(32)}

    def fits(self, other: Runtime) -> bool:
        """Pickles move between equal Python minors and equal cloudpickle majors."""
        return self.python == other.python and (
            self.cloudpickle.split(".")[0] == other.cloudpickle.split(".")[0]
        )

    def __str__(self) -> str:
        return f"python {self.python} / cloudpickle {self.cloudpickle}"


@dataclass(frozen=True, slots=True)
class TaskSpec(Record):
    """One task as the client submits it. ``nb`` buffers of payload follow in the frame.

    ``deps`` is None for a plain task. A graph task (Dask) has a list, maybe empty, of keys (of
    this session) whose results it takes as its first argument, a ``{key: value}`` dict.
    ``keep`` leaves the result on the provider that made it, for dependents and later fetches;
    ``send`` says whether the result's bytes also come to the client (a kept-only result
    arrives as metadata, ``stored=True``).
    """

    key: str
    func: str
    nb: int
    runtime: Runtime
    resources: dict = field(default_factory=dict)
    providers: list | None = None
    timeout: float | None = None
    retries: int = 2
    budget: float | None = None
    max_price: float | None = None
    redundancy: int = 1
    deps: list | None = None
    keep: bool = False
    send: bool = True
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": string(), "func": string(128), "nb": integer(0, MAX_BUFFERS),
        "runtime": record(Runtime), "resources": resource_map, "send": boolean,
        "providers": optional(list_of(string(), 256)), "timeout": optional(number(0, 1e7)),
        "retries": integer(0, 100), "budget": optional(number()), "max_price": optional(number()),
        "redundancy": integer(1, 16), "deps": optional(list_of(string(), 100_000)),
        "keep": boolean,
    }


@dataclass(frozen=True, slots=True)
class Assignment(Record):
    """A task as the gateway hands it to a provider: who pays, what it may use."""

    key: str
    func: str
    nb: int
    account: str
    resources: dict = field(default_factory=dict)
    timeout: float | None = None
    deps: list | None = None
    keep: bool = False
    send: bool = True
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": string(), "func": string(128), "nb": integer(0, MAX_BUFFERS), "account": string(),
        "resources": resource_map, "timeout": optional(number(0, 1e7)),
        "deps": optional(list_of(string(), 100_000)), "keep": boolean, "send": boolean,
    }


@dataclass(frozen=True, slots=True)
class RemoteFailure(Record):
    """An exception as structured data (never a pickle): type, message, traceback text."""

    type: str
    module: str
    message: str
    traceback: str = ""
    SCHEMA: ClassVar[dict[str, Check]] = {
        "type": string(), "module": string(), "message": string(MAX_TEXT_LEN),
        "traceback": string(MAX_TEXT_LEN),
    }


@dataclass(frozen=True, slots=True)
class Result(Record):
    """A task's outcome. ``finished`` carries ``nb`` result buffers; others carry ``error``."""

    key: str
    status: str
    nb: int = 0
    error: RemoteFailure | None = None
    code: str | None = None
    provider: str | None = None
    usage: dict = field(default_factory=dict)
    cost: float = 0.0
    receipt: dict | None = None
    stored: bool = False
    nbytes: int = 0
    SCHEMA: ClassVar[dict[str, Check]] = {
        "stored": boolean, "nbytes": integer(0, 2**60),
        "key": string(), "status": one_of("finished", "error", "cancelled"),
        "nb": integer(0, MAX_BUFFERS), "error": optional(record(RemoteFailure)),
        "code": optional(string(64)), "provider": optional(string()),
        "usage": mapping(16, number()), "cost": number(), "receipt": optional(mapping(32)),
    }


@dataclass(frozen=True, slots=True)
class Event(Record):
    """Something that happened to a running task: it started, printed, or used resources."""

    key: str
    kind: str
    provider: str | None = None
    stream: str | None = None
    text: str | None = None
    usage: dict | None = None
    cost: float | None = None
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": string(), "kind": one_of("running", "output", "usage", "retrying"),
        "provider": optional(string()), "stream": optional(one_of("stdout", "stderr")),
        "text": optional(string(MAX_TEXT_LEN)), "usage": optional(mapping(16, number())),
        "cost": optional(number()),
    }


@dataclass(frozen=True, slots=True)
class ProviderAd(Record):
    """What a provider advertises about itself when it connects."""

    name: str
    cpus: int
    memory: int
    runtime: Runtime
    gpus: int = 0
    prices: dict = field(default_factory=dict)
    sandbox: str = "weak"
    allow: list = field(default_factory=list)
    slots: int = 1
    SCHEMA: ClassVar[dict[str, Check]] = {
        "name": string(64), "cpus": integer(1, 4096), "memory": integer(0, 2**50),
        "runtime": record(Runtime), "gpus": integer(0, 64),
        "prices": mapping(8, number(0, 1e9)), "sandbox": one_of("strong", "weak"),
        "allow": list_of(string(), 1024), "slots": integer(1, 4096),
    }


# --------------------------------------------------------------------------- messages


class Message(Record):
    """A top-level message; ``TYPE`` is its tag on the wire."""

    TYPE: ClassVar[str] = ""
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    TYPE: ClassVar[str] = "challenge"
    nonce: bytes
    gateway: bytes
    version: int = VERSION
    SCHEMA: ClassVar[dict[str, Check]] = {
        "nonce": blob(32), "gateway": blob(32), "version": integer(0, 255),
    }


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """The answer to a challenge: who I am, proven by signing the nonce for this role."""

    TYPE: ClassVar[str] = "hello"
    role: str
    key: bytes
    signature: bytes
    session: str = ""
    name: str = ""
    ad: ProviderAd | None = None
    SCHEMA: ClassVar[dict[str, Check]] = {
        "role": one_of("client", "provider"), "key": blob(32), "signature": blob(64),
        "session": string(64), "name": string(64), "ad": optional(record(ProviderAd)),
    }


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    account: str
    session: str
    gateway: bytes
    max_message: int = 0
    SCHEMA: ClassVar[dict[str, Check]] = {
        "account": string(), "session": string(64), "gateway": blob(32),
        "max_message": integer(0, 2**62),
    }


@dataclass(frozen=True, slots=True)
class Submit(Message):
    """Client -> gateway: a batch of tasks. Buffers: ``funcs`` blobs first, then each task's."""

    TYPE: ClassVar[str] = "submit"
    tasks: list
    funcs: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "tasks": list_of(record(TaskSpec)), "funcs": list_of(string(128), 1024),
    }


@dataclass(frozen=True, slots=True)
class Assign(Message):
    """Gateway -> provider: tasks to run. Buffers: ``funcs`` blobs first, then each task's."""

    TYPE: ClassVar[str] = "assign"
    tasks: list
    funcs: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "tasks": list_of(record(Assignment)), "funcs": list_of(string(128), 1024),
    }


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    keys: list
    SCHEMA: ClassVar[dict[str, Check]] = {"keys": list_of(string())}


@dataclass(frozen=True, slots=True)
class Results(Message):
    """Provider -> gateway -> client: outcomes. Buffers: each result's ``nb``, in order."""

    TYPE: ClassVar[str] = "results"
    results: list
    SCHEMA: ClassVar[dict[str, Check]] = {"results": list_of(record(Result))}


@dataclass(frozen=True, slots=True)
class Events(Message):
    TYPE: ClassVar[str] = "events"
    events: list
    SCHEMA: ClassVar[dict[str, Check]] = {"events": list_of(record(Event))}


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Provider -> gateway: load, and cumulative usage of each running task."""

    TYPE: ClassVar[str] = "heartbeat"
    load: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "load": mapping(16, number(0, 1e15)), "usage": mapping(MAX_BATCH, mapping(16, number())),
    }


@dataclass(frozen=True, slots=True)
class Query(Message):
    """Client -> gateway: a request with a reply (providers, balance, ...)."""

    TYPE: ClassVar[str] = "query"
    id: int
    what: str
    args: dict = field(default_factory=dict)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "id": integer(0, 2**53), "what": string(32), "args": mapping(16),
    }


@dataclass(frozen=True, slots=True)
class Reply(Message):
    TYPE: ClassVar[str] = "reply"
    id: int
    data: Any = None
    error: str | None = None
    code: str | None = None
    SCHEMA: ClassVar[dict[str, Check]] = {
        "id": integer(0, 2**53), "data": anything, "error": optional(string(MAX_TEXT_LEN)),
        "code": optional(string(64)),
    }


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A refusal that does not end the connection (one task's, or one request's)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    keys: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "code": string(64), "message": string(MAX_TEXT_LEN), "keys": list_of(string()),
    }


@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Ask for kept results' bytes: client -> gateway (keys), gateway -> provider (task ids)."""

    TYPE: ClassVar[str] = "fetch"
    keys: list
    SCHEMA: ClassVar[dict[str, Check]] = {"keys": list_of(string())}


@dataclass(frozen=True, slots=True)
class Data(Message):
    """Kept results' bytes: provider -> gateway -> provider (a replica for a dependent task).

    Buffers: ``nbs[i]`` of them per key, in order. ``missing`` names keys the sender lacks.
    """

    TYPE: ClassVar[str] = "data"
    keys: list
    nbs: list
    missing: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "keys": list_of(string()), "nbs": list_of(integer(0, MAX_BUFFERS)),
        "missing": list_of(string()),
    }


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Kept results nobody needs any more: client -> gateway (keys), gateway -> provider."""

    TYPE: ClassVar[str] = "release"
    keys: list
    SCHEMA: ClassVar[dict[str, Check]] = {"keys": list_of(string())}


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Challenge, Hello, Welcome, Submit, Assign, Cancel, Results, Events, Heartbeat,
              Query, Reply, Error, Fetch, Data, Release)
}


# --------------------------------------------------------------------------- frames

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

Frame = bytes | list[Buffer]


def encode_parts(msg: Message, buffers: Sequence[Buffer] = ()) -> Frame:
    """Like :func:`encode`, but a large frame stays a list of parts (no copy of its buffers);
    writers send the parts as websocket fragments."""
    parts = frame_parts({"t": msg.TYPE, **msg.to_wire()}, buffers)
    return b"".join(parts) if frame_size(parts) < JOIN_BELOW else parts


def frame_size(frame: Frame) -> int:
    return len(frame) if isinstance(frame, bytes) else sum(memoryview(b).nbytes for b in frame)


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


def encode(msg: Message, buffers: Sequence[Buffer] = ()) -> bytes:
    """Encode a message and its buffers as one frame."""
    return encode_frame({"t": msg.TYPE, **msg.to_wire()}, buffers)


def decode(data: Buffer, allowed: frozenset[str] | None = None) -> tuple[Message, list[memoryview]]:
    """Decode and validate a frame; ``allowed`` limits which types this side accepts."""
    header, buffers = decode_frame(data)
    kind = header.pop("t", None)
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None or (allowed is not None and kind not in allowed):
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unexpected message type {kind!r}")
    msg = cls.from_wire(header)
    _check_buffer_count(msg, len(buffers))
    return msg, buffers


def _check_buffer_count(msg: Message, count: int) -> None:
    """A message's buffer table must match what its fields say it carries."""
    if isinstance(msg, (Submit, Assign)):
        expected = len(msg.funcs) + sum(t.nb for t in msg.tasks)
    elif isinstance(msg, Results):
        expected = sum(r.nb for r in msg.results)
    elif isinstance(msg, Data):
        if len(msg.nbs) != len(msg.keys):
            raise ProtocolError(ErrorCode.SCHEMA, "data: keys and nbs differ in length")
        expected = sum(msg.nbs)
    else:
        expected = 0
    if expected != count:
        raise ProtocolError(
            ErrorCode.SCHEMA, f"{msg.TYPE}: header names {expected} buffers, frame has {count}"
        )


def split_buffers(counts: Sequence[int], buffers: Sequence[memoryview]) -> list[list[memoryview]]:
    """Cut a flat buffer list into consecutive groups of ``counts``."""
    out, pos = [], 0
    for n in counts:
        out.append(list(buffers[pos:pos + n]))
        pos += n
    return out


def close_reason(code: ErrorCode, message: str) -> str:
    """A close reason within the 123 bytes a websocket close frame allows."""
    return ProtocolError(code, message).reason
