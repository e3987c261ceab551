"""Schema checking for wire headers: error codes, field checks and the ``Record`` base.

Generic and I/O-free: :mod:`gateway.protocol` declares its messages with these checks. Every
check either returns the value or raises :class:`ProtocolError` naming the field and the rule, so
a malformed header is refused with a reason, never half-read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from enum import StrEnum
from typing import Any, ClassVar

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
#: Items in one chunk of a ``map`` (one task that runs ``fn`` on each in turn). Bounds the
#: per-item lists a chunk's spec, assignment and result carry, and its receipt leaf's item
#: hashes (``gateway.receipt_log.MAX_LEAF_ITEMS``).
MAX_ITEMS = 512


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
        obj = cls(**kwargs)
        problem = obj.problem()
        if problem:
            raise ProtocolError(ErrorCode.SCHEMA, f"{where or cls.__name__}: {problem}")
        return obj

    def problem(self) -> str | None:
        """What makes the fields inconsistent with each other (each is valid alone), or None;
        records whose fields depend on each other override it."""
        return None

    #: Fields left out of the wire form while empty (0, [], None): newer optional fields, so a
    #: header that does not use them keeps its bytes and its size.
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset()

    def to_wire(self) -> dict:
        out = {}
        omit = self.OMIT_EMPTY
        for name, _ in _field_table(type(self)):
            value = getattr(self, name)
            if omit and name in omit and not value:
                continue
            if isinstance(value, Record):
                value = value.to_wire()
            elif isinstance(value, list) and value and isinstance(value[0], Record):
                value = [v.to_wire() for v in value]
            out[name] = value
        return out


class Message(Record):
    """A top-level message; ``TYPE`` is its tag on the wire."""

    TYPE: ClassVar[str] = ""
    __slots__ = ()


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
