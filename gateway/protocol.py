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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gateway.blob_messages import (  # noqa: F401  (re-exported: the blob messages)
    BLOB_MESSAGES,
    Abort,
    Chunk,
    Drop,
    Evicted,
    Scatter,
    Stored,
    Want,
    ref_list,
    spec_refs_problem,
)
from gateway.framing import JOIN_BELOW as JOIN_BELOW
from gateway.framing import MAGIC as MAGIC
from gateway.framing import VERSION as VERSION
from gateway.framing import Buffer as Buffer
from gateway.framing import Frame as Frame
from gateway.framing import Send as Send
from gateway.framing import Transient as Transient
from gateway.framing import decode_frame as decode_frame
from gateway.framing import encode_frame as encode_frame
from gateway.framing import frame_parts as frame_parts
from gateway.framing import frame_size as frame_size
from gateway.framing import header_length as header_length
from gateway.framing import scratch as scratch
from gateway.framing import split_buffers as split_buffers
from gateway.framing import transient as transient
from gateway.item_checks import chunk_problem as chunk_problem
from gateway.item_checks import item_outcomes_problem as item_outcomes_problem
from gateway.schema import (  # noqa: F401  (re-exported: the protocol's vocabulary)
    MAX_BATCH,
    MAX_BUFFERS,
    MAX_HEADER_BYTES,
    MAX_ITEMS,
    MAX_KEY_LEN,
    MAX_TEXT_LEN,
    Check,
    ErrorCode,
    Message,
    ProtocolError,
    Record,
    anything,
    blob,
    boolean,
    integer,
    list_of,
    mapping,
    number,
    one_of,
    optional,
    record,
    string,
)
from gateway.spec_fields import MAX_PACKAGE_NAME as MAX_PACKAGE_NAME
from gateway.spec_fields import MAX_PACKAGES as MAX_PACKAGES
from gateway.spec_fields import MAX_REQUIREMENT_LEN as MAX_REQUIREMENT_LEN
from gateway.spec_fields import MAX_REQUIREMENTS as MAX_REQUIREMENTS
from gateway.spec_fields import MAX_VERSION_LEN as MAX_VERSION_LEN
from gateway.spec_fields import RESOURCE_CHECKS as RESOURCE_CHECKS
from gateway.spec_fields import package_map as package_map
from gateway.spec_fields import parse_requirement as parse_requirement
from gateway.spec_fields import requirement_list as requirement_list
from gateway.spec_fields import resource_map as resource_map
from gateway.zk_fields import ProofSpec as ProofSpec


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
    arrives as metadata, ``stored=True``). ``items`` > 0 makes it a chunk of a ``map``
    (:func:`chunk_problem`): one task, one escrow, one result with an outcome per item.
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
    items: int = 0
    parts: list = field(default_factory=list)
    #: PEP 508 requirements the task's provider must meet (declared and inferred by the client).
    packages: list = field(default_factory=list)
    #: Blobs the payload names (:mod:`gateway.blob_messages`): they travel apart, cut-through.
    refs: list = field(default_factory=list)
    #: Spot checks (:mod:`gateway.spot_check`): the chance the result is checked elsewhere, and
    #: the hash of the check function's pickle (in the frame's ``funcs``), if it has one.
    spot_check: float = 0.0
    check: str | None = None
    #: ``{"steps": N, "every": K}``: a refereed task (:mod:`gateway.referee`); empty: not one.
    refereed: dict = field(default_factory=dict)
    #: A proof-carrying task (``decompute[zk]``): paid only for a proof that verifies.
    proof: ProofSpec | None = None
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": string(), "func": string(128), "nb": integer(0, MAX_BUFFERS),
        "runtime": record(Runtime), "resources": resource_map, "send": boolean,
        "packages": requirement_list, "refs": ref_list, "spot_check": number(0.0, 1.0),
        "check": optional(string(128)), "refereed": mapping(4, integer(0, 10**7)),
        "proof": optional(record(ProofSpec)),
        "providers": optional(list_of(string(), 256)), "timeout": optional(number(0, 1e7)),
        "retries": integer(0, 100), "budget": optional(number()), "max_price": optional(number()),
        "redundancy": integer(1, 16), "deps": optional(list_of(string(), 100_000)),
        "keep": boolean, "items": integer(0, MAX_ITEMS),
        "parts": list_of(integer(1, MAX_BUFFERS), MAX_ITEMS),
    }
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset({"items", "parts", "packages", "refs",
                                                      "spot_check", "check", "refereed", "proof"})

    def problem(self) -> str | None:
        if self.proof is not None and (self.items or self.deps is not None or self.keep
                                       or self.redundancy > 1):
            return "a proof-carrying task is a plain task (no map chunk, graph or redundancy)"
        return (chunk_problem(self.items, self.parts, self.nb, self.deps, self.keep)
                or spec_refs_problem(self.refs, self.nb, self.items))


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
    items: int = 0
    parts: list = field(default_factory=list)
    #: The task's requirements: the environment an installing provider runs it in.
    packages: list = field(default_factory=list)
    #: Blobs the payload names; the gateway sends them (or has them here) before they are read.
    refs: list = field(default_factory=list)
    #: Whether big result buffers may stay here as blobs (``Result.refs``) for the gateway to
    #: pull (plain tasks without replicas); otherwise they travel inside the result.
    blobs: bool = False
    SCHEMA: ClassVar[dict[str, Check]] = {
        "key": string(), "func": string(128), "nb": integer(0, MAX_BUFFERS), "account": string(),
        "resources": resource_map, "timeout": optional(number(0, 1e7)),
        "deps": optional(list_of(string(), 100_000)), "keep": boolean, "send": boolean,
        "items": integer(0, MAX_ITEMS), "parts": list_of(integer(1, MAX_BUFFERS), MAX_ITEMS),
        "packages": requirement_list, "refs": ref_list, "blobs": boolean,
    }
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset({"items", "parts", "packages", "refs",
                                                      "blobs"})

    def problem(self) -> str | None:
        return (chunk_problem(self.items, self.parts, self.nb, self.deps, self.keep)
                or spec_refs_problem(self.refs, self.nb, self.items))


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
    """A task's outcome. ``finished`` carries ``nb`` result buffers; others carry ``error``.

    A chunk's ``finished`` result has an outcome per item: item ``i``'s result is the next
    ``parts[i]`` buffers; the items listed in ``failed`` raised (their ``parts`` are 0) and
    ``errors`` holds their exceptions, in the same order. A chunk that did not run to its end
    (cancelled, timed out, its process died) is an ``error`` or ``cancelled`` result without
    ``parts``: every item of it ends so."""

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
    parts: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    #: Result buffers left on the provider as blobs (content ids), pulled cut-through.
    refs: list = field(default_factory=list)
    #: What the gateway did to verify it (spot checks); set by the gateway, never a provider.
    verification: dict | None = None
    SCHEMA: ClassVar[dict[str, Check]] = {
        "verification": optional(mapping(16)), "stored": boolean, "nbytes": integer(0, 2**60),
        "refs": ref_list,
        "key": string(), "status": one_of("finished", "error", "cancelled"),
        "nb": integer(0, MAX_BUFFERS), "error": optional(record(RemoteFailure)),
        "code": optional(string(64)), "provider": optional(string()),
        "usage": mapping(16, number()), "cost": number(), "receipt": optional(mapping(32)),
        "parts": list_of(integer(0, MAX_BUFFERS), MAX_ITEMS),
        "failed": list_of(integer(0, MAX_ITEMS - 1), MAX_ITEMS),
        "errors": list_of(record(RemoteFailure), MAX_ITEMS),
    }
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset({"parts", "failed", "errors", "refs",
                                                      "verification"})

    @property
    def items(self) -> int:
        """Items this result answers for: 0 for a plain task's (or a chunk's that did not run)."""
        return len(self.parts)

    @property
    def text_size(self) -> int:
        """Characters of error text this result carries (its own and its items'): what makes
        its share of a frame header large, for those who cut results into frames."""
        return sum(len(e.type) + len(e.module) + len(e.message) + len(e.traceback)
                   for e in (self.error, *self.errors) if e is not None)

    def problem(self) -> str | None:
        if self.refs and (self.parts or self.stored or self.status != "finished"
                          or any(r[0] < 0 for r in self.refs)):
            return "only a finished plain result leaves positioned blobs (refs)"
        return item_outcomes_problem(self) or spec_refs_problem(self.refs, self.nb, 0)


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
    #: Distributions its task processes can import, ``{canonical name: version}``.
    packages: dict = field(default_factory=dict)
    #: Whether it builds environments for requirements it lacks (``--install-packages``).
    installs: bool = False
    SCHEMA: ClassVar[dict[str, Check]] = {
        "name": string(64), "cpus": integer(1, 4096), "memory": integer(0, 2**50),
        "runtime": record(Runtime), "gpus": integer(0, 64),
        "prices": mapping(8, number(0, 1e9)), "sandbox": one_of("strong", "weak"),
        "allow": list_of(string(), 1024), "slots": integer(1, 4096),
        "packages": package_map, "installs": boolean,
    }
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset({"packages", "installs"})


# --------------------------------------------------------------------------- messages


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
    #: What this gateway does beyond the base protocol: ``"chunks"`` (it passes a chunk's
    #: ``items``/``parts`` to providers and checks their per-item outcomes).
    features: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "account": string(), "session": string(64), "gateway": blob(32),
        "max_message": integer(0, 2**62), "features": list_of(string(32), 64),
    }
    OMIT_EMPTY: ClassVar[frozenset[str]] = frozenset({"features"})


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


@dataclass(frozen=True, slots=True)
class Packages(Message):
    """Provider -> gateway: its advertised packages changed (an install, an upgrade).

    Replaces ``packages`` and ``installs`` of the sender's own advertisement; nothing else of
    it, and never another provider's (the gateway applies it to the connection it came on)."""

    TYPE: ClassVar[str] = "packages"
    packages: dict = field(default_factory=dict)
    installs: bool = False
    SCHEMA: ClassVar[dict[str, Check]] = {"packages": package_map, "installs": boolean}


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Challenge, Hello, Welcome, Submit, Assign, Cancel, Results, Events, Heartbeat,
              Query, Reply, Error, Fetch, Data, Release, Packages, *BLOB_MESSAGES)
}


# --------------------------------------------------------------------------- frames


def encode_parts(msg: Message, buffers: Sequence[Buffer] = ()) -> Frame:
    """Like :func:`encode`, but a large frame stays a list of parts (no copy of its buffers);
    writers send the parts as websocket fragments."""
    parts = frame_parts({"t": msg.TYPE, **msg.to_wire()}, buffers)
    return b"".join(parts) if frame_size(parts) < JOIN_BELOW else parts


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
    elif isinstance(msg, Chunk):
        expected = 1
    else:
        expected = 0
    if expected != count:
        raise ProtocolError(
            ErrorCode.SCHEMA, f"{msg.TYPE}: header names {expected} buffers, frame has {count}"
        )


def close_reason(code: ErrorCode, message: str) -> str:
    """A close reason within the 123 bytes a websocket close frame allows."""
    return ProtocolError(code, message).reason
