"""gateway/protocol.py without a network: every message round-trips, every broken rule is refused.

The gateway parses every frame anyone sends it with :func:`gateway.protocol.decode`, so the only
exception ``decode`` may ever raise is :class:`ProtocolError` (which the shell turns into a close
reason); anything else would be a crash path a peer can reach.
"""

from __future__ import annotations

import copy
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol as p
from gateway.protocol import ErrorCode, ProtocolError

RUNTIME = p.Runtime(python="3.11", cloudpickle="3.1.1")
AD = p.ProviderAd(name="alpha", cpus=4, memory=8 << 30, runtime=RUNTIME, gpus=1,
                  prices={"cpu": 0.5, "memory": 0.1}, sandbox="strong", allow=["acct"], slots=4)
SPEC = p.TaskSpec(key="k-1", func="f" * 32, nb=2, runtime=RUNTIME,
                  resources={"cpus": 1, "memory": 1 << 30, "gpus": 0}, providers=["alpha"],
                  timeout=5.0, retries=1, budget=2.5, max_price=0.5, redundancy=2,
                  deps=["k-0"], keep=True)
FAILURE = p.RemoteFailure(type="ZeroDivisionError", module="builtins",
                          message="division by zero", traceback="Traceback ...\n")

#: One example of every message type, with the buffers its header says it carries.
SAMPLES: dict[str, tuple[p.Message, list[bytes]]] = {
    "challenge": (p.Challenge(nonce=b"n" * 32, gateway=b"g" * 32), []),
    "hello": (p.Hello(role="provider", key=b"k" * 32, signature=b"s" * 64, session="",
                      name="alpha", ad=AD), []),
    "welcome": (p.Welcome(account="ab" * 32, session="s1", gateway=b"g" * 32), []),
    "submit": (p.Submit(tasks=[SPEC, p.TaskSpec(key="k-2", func="f" * 32, nb=0, runtime=RUNTIME)],
                        funcs=["f" * 32]), [b"function", b"args", b"\x00" * 1000]),
    "assign": (p.Assign(tasks=[p.Assignment(key="s/k-1", func="f" * 32, nb=1, account="a",
                                            resources={"cpus": 2}, timeout=1.5)],
                        funcs=["f" * 32]), [b"function", b"args"]),
    "cancel": (p.Cancel(keys=["a", "b"]), []),
    "results": (p.Results(results=[
        p.Result(key="k-1", status="finished", nb=2, provider="alpha-1",
                 usage={"cpu_seconds": 1.5}, cost=0.25, receipt={"sig": b"x"}),
        p.Result(key="k-2", status="error", error=FAILURE, code="internal"),
        p.Result(key="k-3", status="cancelled"),
    ]), [b"result", b"\xff" * 10]),
    "events": (p.Events(events=[
        p.Event(key="k-1", kind="running", provider="alpha-1"),
        p.Event(key="k-1", kind="output", stream="stderr", text="hello\n"),
        p.Event(key="k-1", kind="usage", usage={"cpu_seconds": 0.5}, cost=0.01),
    ]), []),
    "heartbeat": (p.Heartbeat(load={"cpu_percent": 50.0},
                              usage={"s/k-1": {"cpu_seconds": 2.0}}), []),
    "query": (p.Query(id=7, what="providers", args={"x": [1, 2]}), []),
    "reply": (p.Reply(id=7, data=[{"id": "alpha-1", "nested": {"a": [1, 2.5, None]}}]), []),
    "error": (p.Error(code="limit", message="too many", keys=["k-1"]), []),
    "fetch": (p.Fetch(keys=["k-1", "k-2"]), []),
    "data": (p.Data(keys=["s/k-1", "s/k-2"], nbs=[1, 2], missing=["s/k-3"]),
             [b"pickle", b"pickle", b"\x00" * 64]),
    "release": (p.Release(keys=["k-1"]), []),
    "packages": (p.Packages(packages={"numpy": "2.1.0", "scikit-learn": "1.5.2"},
                            installs=True), []),
    "want": (p.Want(x=7, blob="s" + "ab" * 32, owner="acct"), []),
    "chunk": (p.Chunk(x=7, blob="t" + "cd" * 16, size=10, offset=0), [b"0123456789"]),
    "abort": (p.Abort(x=7, reason="gone"), []),
    "scatter": (p.Scatter(blobs=[["s" + "ab" * 32, 100]], broadcast=True), []),
    "stored": (p.Stored(blobs=["s" + "ab" * 32], holders=[2], errors=[""]), []),
    "drop": (p.Drop(blobs=["s" + "ab" * 32]), []),
    "evicted": (p.Evicted(blobs=["acct/s" + "ab" * 32]), []),
}


def frame(header: dict, buffers: list[bytes] | tuple = ()) -> bytes:
    return p.encode_frame(header, buffers)


def header_of(kind: str) -> dict:
    msg, _ = SAMPLES[kind]
    return copy.deepcopy({"t": msg.TYPE, **msg.to_wire()})  # to_wire shares the message's dicts


def refused(data: bytes, code: ErrorCode, *words: str, allowed: frozenset[str] | None = None
            ) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        p.decode(data, allowed=allowed)
    assert info.value.code is code, info.value
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    return info.value


# --------------------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(p.MESSAGES)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_message_round_trips_with_its_buffers(kind: str) -> None:
    msg, buffers = SAMPLES[kind]
    data = p.encode(msg, buffers)
    assert data[:2] == p.MAGIC and data[2] == p.VERSION
    decoded, views = p.decode(data)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert [bytes(v) for v in views] == buffers
    # bytearray and memoryview inputs decode the same way (websockets hands over either)
    assert p.decode(bytearray(data))[0] == msg
    assert p.decode(memoryview(data))[0] == msg


def test_buffers_are_zero_copy_views_of_the_frame() -> None:
    msg, buffers = SAMPLES["submit"]
    data = bytearray(p.encode(msg, buffers))
    _, views = p.decode(data)
    views[-1].tobytes()
    data[-1] = 7  # a view sees the frame's bytes, it is not a copy
    assert views[-1][-1] == 7


def test_nested_records_are_rebuilt_as_their_types() -> None:
    msg, buffers = SAMPLES["submit"]
    decoded, _ = p.decode(p.encode(msg, buffers))
    assert isinstance(decoded.tasks[0], p.TaskSpec)
    assert isinstance(decoded.tasks[0].runtime, p.Runtime)
    hello, _ = p.decode(p.encode(*SAMPLES["hello"]))
    assert isinstance(hello.ad, p.ProviderAd) and isinstance(hello.ad.runtime, p.Runtime)
    results, _ = p.decode(p.encode(*SAMPLES["results"]))
    assert isinstance(results.results[1].error, p.RemoteFailure)


def test_defaults_fill_in_optional_fields() -> None:
    msg, _ = p.decode(frame({"t": "submit", "tasks": [
        {"key": "k", "func": "f", "nb": 0, "runtime": {"python": "3.11", "cloudpickle": "3"}}
    ], "funcs": ["f"]}, [b"fn"]))
    task = msg.tasks[0]
    assert (task.retries, task.redundancy, task.timeout, task.providers, task.resources,
            task.keep) == (2, 1, None, None, {}, False)


def test_split_buffers_cuts_consecutive_groups() -> None:
    bufs = [memoryview(bytes([i])) for i in range(6)]
    groups = p.split_buffers([1, 0, 3, 2], bufs)
    assert [[bytes(b) for b in g] for g in groups] == [[b"\x00"], [], [b"\x01", b"\x02", b"\x03"],
                                                       [b"\x04", b"\x05"]]


def test_large_buffer_round_trips() -> None:
    big = bytes(range(256)) * (1 << 14)  # 4 MiB
    msg = p.Results(results=[p.Result(key="k", status="finished", nb=1)])
    _, views = p.decode(p.encode(msg, [big]))
    assert views[0] == big


# --------------------------------------------------------------------------- frame rejections


@pytest.mark.parametrize("data", [b"", b"D", b"DC", b"DC\x01", b"DC\x01\x00\x00\x00"])
def test_short_frame(data: bytes) -> None:
    refused(data, ErrorCode.BAD_FRAME, "shorter")


def test_bad_magic() -> None:
    good = p.encode(*SAMPLES["cancel"])
    refused(b"XX" + good[2:], ErrorCode.BAD_FRAME, "magic")
    refused(b"GET / HTTP/1.1\r\n\r\n", ErrorCode.BAD_FRAME, "magic")


@pytest.mark.parametrize("version", [0, p.VERSION + 1, 255])
def test_bad_version(version: int) -> None:
    good = p.encode(*SAMPLES["cancel"])
    err = refused(good[:2] + bytes([version]) + good[3:], ErrorCode.BAD_VERSION)
    assert str(version) in str(err) and str(p.VERSION) in str(err)


def test_header_length_beyond_the_frame() -> None:
    good = p.encode(*SAMPLES["cancel"])
    hlen = struct.unpack_from("!I", good, 3)[0]
    refused(good[:3] + struct.pack("!I", hlen + 1) + good[7:], ErrorCode.TOO_BIG, "header length")
    refused(good[:3] + struct.pack("!I", 2**32 - 1) + good[7:], ErrorCode.TOO_BIG)
    refused(good[:-1], ErrorCode.TOO_BIG)  # header cut short


def test_header_length_over_the_limit() -> None:
    data = p.MAGIC + bytes([p.VERSION]) + struct.pack("!I", p.MAX_HEADER_BYTES + 1)
    refused(data + b"\x80" * (p.MAX_HEADER_BYTES + 1), ErrorCode.TOO_BIG, "header length")
    with pytest.raises(ProtocolError) as info:
        p.decode_frame(p.encode(*SAMPLES["cancel"]), max_header=4)
    assert info.value.code is ErrorCode.TOO_BIG


def raw(header_bytes: bytes, tail: bytes = b"") -> bytes:
    return p.MAGIC + bytes([p.VERSION]) + struct.pack("!I", len(header_bytes)) + header_bytes + tail


@pytest.mark.parametrize("header", [[1, 2], "text", 5, None, b"bytes", 1.5, True])
def test_header_that_is_not_a_map(header: Any) -> None:
    refused(raw(msgpack.packb(header)), ErrorCode.BAD_FRAME, "not a map")


@pytest.mark.parametrize("garbage", [
    b"", b"\xc1", b"\x81", b"\x81\xa1t", b"\xdf\xff\xff\xff\xff",
    msgpack.packb({"t": "cancel"}) + b"\x00",  # trailing bytes after the map
    msgpack.packb({1: "int key"}),  # strict_map_key: only str/bytes keys
    b"\xc7\x01\xff\x00",  # a timestamp ext with an impossible length
])
def test_header_that_is_not_msgpack(garbage: bytes) -> None:
    refused(raw(garbage), ErrorCode.BAD_FRAME)


def test_deeply_nested_header_is_refused_not_crashed() -> None:
    refused(raw(b"\x91" * 100_000 + b"\xc0"), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("table", [
    "not a list", 5, {"a": 1}, [-1], [1.0], ["1"], [True], [None], [[1]],
    [0] * (p.MAX_BUFFERS + 1),
])
def test_malformed_buffer_table(table: Any) -> None:
    refused(raw(msgpack.packb({"t": "cancel", "keys": [], "b": table})), ErrorCode.BAD_FRAME,
            "buffer table")


@pytest.mark.parametrize(("table", "tail"), [
    ([3], b"ab"), ([3], b"abcd"), ([], b"x"), ([1, 1], b"a"), ([2**64 - 1], b""),
])
def test_buffer_lengths_not_adding_up(table: list, tail: bytes) -> None:
    refused(raw(msgpack.packb({"t": "cancel", "keys": [], "b": table}), tail),
            ErrorCode.BAD_FRAME, "add up")


# --------------------------------------------------------------------------- message rejections


@pytest.mark.parametrize("kind", ["nope", "", "Submit", "ready", "out"])
def test_unknown_type(kind: str) -> None:
    refused(frame({"t": kind}), ErrorCode.UNKNOWN_TYPE, repr(kind))


@pytest.mark.parametrize("header", [{}, {"keys": []}, {"t": 1}, {"t": None}, {"t": ["cancel"]},
                                    {"t": b"cancel"}, {b"t": "cancel", "keys": []}])
def test_missing_or_non_string_type(header: dict) -> None:
    refused(frame(header), ErrorCode.UNKNOWN_TYPE)


@pytest.mark.parametrize("kind", sorted(set(SAMPLES) - {"hello"}))
def test_type_not_allowed_on_this_side(kind: str) -> None:
    refused(p.encode(*SAMPLES[kind]), ErrorCode.UNKNOWN_TYPE, allowed=frozenset({"hello"}))


def test_allowed_type_passes() -> None:
    msg, _ = p.decode(p.encode(*SAMPLES["hello"]), allowed=frozenset({"hello"}))
    assert isinstance(msg, p.Hello)


@pytest.mark.parametrize(("kind", "field_name"), [
    ("challenge", "nonce"), ("hello", "role"), ("hello", "key"), ("hello", "signature"),
    ("welcome", "account"), ("submit", "tasks"), ("assign", "tasks"), ("cancel", "keys"),
    ("results", "results"), ("events", "events"), ("query", "id"), ("query", "what"),
    ("reply", "id"), ("error", "code"), ("error", "message"), ("fetch", "keys"),
    ("data", "keys"), ("data", "nbs"), ("release", "keys"),
])
def test_missing_required_field(kind: str, field_name: str) -> None:
    header = header_of(kind)
    del header[field_name]
    _, buffers = SAMPLES[kind]
    refused(frame(header, buffers), ErrorCode.SCHEMA, "missing", field_name)


@pytest.mark.parametrize(("path", "field_name"), [
    (("tasks", 0), "runtime"), (("tasks", 0), "key"), (("tasks", 0, "runtime"), "python"),
])
def test_missing_field_in_a_nested_record(path: tuple, field_name: str) -> None:
    header = header_of("submit")
    target: Any = header
    for step in path:
        target = target[step]
    del target[field_name]
    refused(frame(header, SAMPLES["submit"][1]), ErrorCode.SCHEMA, "missing", field_name)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_unknown_field(kind: str) -> None:
    header = dict(header_of(kind), surprise=1)
    refused(frame(header, SAMPLES[kind][1]), ErrorCode.SCHEMA, "unknown field", "surprise")


def test_unknown_field_in_a_nested_record() -> None:
    header = header_of("submit")
    header["tasks"][0]["runtime"]["extra"] = "x"
    refused(frame(header, SAMPLES["submit"][1]), ErrorCode.SCHEMA, "unknown field", "extra")


def test_unknown_str_and_bytes_fields_together_are_a_schema_error() -> None:
    refused(frame({"t": "cancel", "keys": [], "zz": 1, b"yy": 2}), ErrorCode.SCHEMA,
            "unknown field")


def test_unknown_bytes_field_alone_is_a_schema_error() -> None:
    refused(frame({"t": "cancel", "keys": [], b"yy": 2}), ErrorCode.SCHEMA, "unknown field")


def with_field(kind: str, path: tuple, value: Any) -> bytes:
    header = header_of(kind)
    target: Any = header
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return frame(header, SAMPLES[kind][1])


#: (message kind, path to the field, a value of the wrong type, what the field is)
WRONG_TYPES = [
    # string
    ("hello", ("session",), 1, "a string"), ("query", ("what",), b"providers", "a string"),
    ("submit", ("tasks", 0, "key"), None, "a string"), ("cancel", ("keys", 0), 5, "a string"),
    # integer (bool and float are not integers)
    ("query", ("id",), "7", "an integer"), ("query", ("id",), True, "an integer"),
    ("query", ("id",), 7.0, "an integer"), ("submit", ("tasks", 0, "nb"), [2], "an integer"),
    ("hello", ("ad", "cpus"), 4.5, "an integer"),
    # number
    ("submit", ("tasks", 0, "timeout"), "5", "a number"),
    ("submit", ("tasks", 0, "timeout"), False, "a number"),
    ("results", ("results", 0, "cost"), [1], "a number"),
    ("heartbeat", ("load", "cpu_percent"), "50", "a number"),
    # bool
    ("submit", ("tasks", 0, "keep"), 1, "a boolean"),
    ("submit", ("tasks", 0, "keep"), "true", "a boolean"),
    # bytes
    ("challenge", ("nonce",), "n" * 32, "bytes"), ("hello", ("key",), [0] * 32, "bytes"),
    ("welcome", ("gateway",), None, "bytes"),
    # list
    ("cancel", ("keys",), "k", "a list"), ("submit", ("tasks",), {"0": {}}, "a list"),
    ("submit", ("tasks", 0, "providers"), "alpha", "a list"),
    ("error", ("keys",), None, "a list"),
    # map
    ("query", ("args",), [], "a map"), ("heartbeat", ("usage",), "x", "a map"),
    ("submit", ("tasks", 0, "resources"), [1], "a map"),
    ("hello", ("ad", "prices"), 0.5, "a map"),
    # nested record
    ("submit", ("tasks", 0), "task", "a map"), ("submit", ("tasks", 0, "runtime"), "3.11", "a map"),
    ("hello", ("ad",), ["alpha"], "a map"), ("results", ("results", 1, "error"), "boom", "a map"),
    ("events", ("events", 0), 1, "a map"),
]


@pytest.mark.parametrize(("kind", "path", "value", "expected"), WRONG_TYPES,
                         ids=[f"{k}.{'.'.join(map(str, pa))}={v!r}"[:60]
                              for k, pa, v, _ in WRONG_TYPES])
def test_wrong_field_type(kind: str, path: tuple, value: Any, expected: str) -> None:
    err = refused(with_field(kind, path, value), ErrorCode.SCHEMA, "must be", expected)
    assert repr(path[-1])[1:-1] in str(err)  # the message names the field


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("hello", ("role",), "admin"), ("hello", ("ad", "sandbox"), "none"),
    ("results", ("results", 0, "status"), "done"), ("events", ("events", 0, "kind"), "boom"),
    ("events", ("events", 1, "stream"), "stdin"), ("hello", ("role",), 1),
    ("hello", ("role",), ["client"]),
])
def test_value_outside_its_choices(kind: str, path: tuple, value: Any) -> None:
    refused(with_field(kind, path, value), ErrorCode.SCHEMA, "one of")


@pytest.mark.parametrize(("kind", "path", "value"), [
    ("query", ("id",), -1), ("query", ("id",), 2**53 + 1), ("query", ("id",), 2**64 - 1),
    ("query", ("id",), -(2**63)), ("submit", ("tasks", 0, "retries"), 101),
    ("submit", ("tasks", 0, "redundancy"), 0), ("submit", ("tasks", 0, "redundancy"), 17),
    ("submit", ("tasks", 0, "nb"), p.MAX_BUFFERS + 1), ("hello", ("ad", "cpus"), 0),
    ("challenge", ("version",), 256),
    ("submit", ("tasks", 0, "timeout"), -0.5), ("submit", ("tasks", 0, "timeout"), 1e7 + 1),
    ("submit", ("tasks", 0, "budget"), -1), ("results", ("results", 0, "cost"), 1e19),
    ("submit", ("tasks", 0, "timeout"), math.inf), ("results", ("results", 0, "cost"), -math.inf),
    ("submit", ("tasks", 0, "resources", "cpus"), 5000),
    ("submit", ("tasks", 0, "resources", "memory"), -1),
    ("submit", ("tasks", 0, "resources", "gpus"), 65),
    ("hello", ("ad", "prices", "cpu"), 1e10),
])
def test_out_of_range_number(kind: str, path: tuple, value: Any) -> None:
    refused(with_field(kind, path, value), ErrorCode.SCHEMA, "out of range")


@pytest.mark.parametrize(("kind", "path"), [
    ("submit", ("tasks", 0, "timeout")), ("submit", ("tasks", 0, "budget")),
    ("submit", ("tasks", 0, "max_price")), ("results", ("results", 0, "cost")),
    ("results", ("results", 0, "usage", "cpu_seconds")), ("heartbeat", ("load", "cpu_percent")),
    ("events", ("events", 2, "cost")), ("submit", ("tasks", 0, "resources", "cpus")),
])
def test_nan_is_refused(kind: str, path: tuple) -> None:
    refused(with_field(kind, path, math.nan), ErrorCode.SCHEMA, "out of range")


@pytest.mark.parametrize(("kind", "path", "limit"), [
    ("submit", ("tasks", 0, "key"), p.MAX_KEY_LEN), ("cancel", ("keys", 0), p.MAX_KEY_LEN),
    ("hello", ("session",), 64), ("hello", ("ad", "name"), 64),
    ("submit", ("tasks", 0, "func"), 128), ("error", ("message",), p.MAX_TEXT_LEN),
    ("events", ("events", 1, "text"), p.MAX_TEXT_LEN),
    ("results", ("results", 1, "error", "traceback"), p.MAX_TEXT_LEN),
])
def test_too_long_string(kind: str, path: tuple, limit: int) -> None:
    assert p.decode(with_field(kind, path, "é" * limit))  # exactly at the limit is fine
    refused(with_field(kind, path, "x" * (limit + 1)), ErrorCode.SCHEMA, "longer than")


@pytest.mark.parametrize(("path", "value"), [
    (("nonce",), b"n" * 31), (("nonce",), b"n" * 33), (("gateway",), b""),
])
def test_blob_of_the_wrong_length(path: tuple, value: bytes) -> None:
    refused(with_field("challenge", path, value), ErrorCode.SCHEMA, "wrong length")


def test_oversized_batch() -> None:
    keys = [f"k{i}" for i in range(p.MAX_BATCH + 1)]
    refused(frame({"t": "cancel", "keys": keys}), ErrorCode.TOO_BIG, "over")
    assert p.decode(frame({"t": "cancel", "keys": keys[:-1]}))[0].keys == keys[:-1]
    results = [{"key": "k", "status": "cancelled"}] * (p.MAX_BATCH + 1)
    refused(frame({"t": "results", "results": results}), ErrorCode.TOO_BIG)
    refused(with_field("submit", ("funcs",), ["f"] * 1025), ErrorCode.TOO_BIG)


def test_oversized_map() -> None:
    refused(with_field("query", ("args",), {f"a{i}": i for i in range(17)}), ErrorCode.TOO_BIG)
    refused(with_field("hello", ("ad", "prices"), {f"p{i}": 1 for i in range(9)}),
            ErrorCode.TOO_BIG)


@pytest.mark.parametrize("key", [b"cpu", "x" * (p.MAX_KEY_LEN + 1)])
def test_map_keys_must_be_short_strings(key: Any) -> None:
    refused(with_field("query", ("args",), {key: 1}), ErrorCode.SCHEMA, "short string")


@pytest.mark.parametrize("name", ["tpus", "CPUS", "disk", ""])
def test_unknown_resource(name: str) -> None:
    refused(with_field("submit", ("tasks", 0, "resources"), {name: 1}), ErrorCode.SCHEMA,
            "unknown resource")


@pytest.mark.parametrize(("kind", "buffers"), [
    ("submit", [b"function", b"args"]),  # names 3 (1 func + 2), carries 2
    ("submit", [b"function", b"args", b"x", b"extra"]),
    ("assign", [b"function"]),
    ("results", [b"result"]),
    ("results", []),
    ("cancel", [b"unexpected"]),
    ("hello", [b"unexpected"]),
    ("query", [b"a", b"b"]),
    ("data", [b"pickle", b"pickle"]),
    ("fetch", [b"unexpected"]),
])
def test_buffer_count_mismatch(kind: str, buffers: list[bytes]) -> None:
    msg, _ = SAMPLES[kind]
    refused(p.encode(msg, buffers), ErrorCode.SCHEMA, "buffers")


def test_data_keys_and_counts_must_pair_up() -> None:
    refused(with_field("data", ("nbs",), [1, 2, 0]), ErrorCode.SCHEMA)


# --------------------------------------------------------------------------- close reasons


@pytest.mark.parametrize("message", ["short", "x" * 500, "é" * 200, "日本語" * 100, "🙂" * 100])
def test_reason_fits_a_close_frame(message: str) -> None:
    for code in ErrorCode:
        reason = ProtocolError(code, message).reason
        assert len(reason.encode()) <= 123
        assert reason.startswith(f"{code.value}: ")
        reason.encode().decode()  # never a cut multi-byte character
        assert p.close_reason(code, message) == reason


def test_reasons_of_real_refusals_fit_a_close_frame() -> None:
    long_field = "f" * 250
    err = refused(frame({"t": "cancel", "keys": [], long_field: 1}), ErrorCode.SCHEMA)
    assert len(err.reason.encode()) <= 123 and err.reason.startswith("schema: ")


# --------------------------------------------------------------------------- properties

VALID_FRAMES = [p.encode(msg, bufs) for msg, bufs in SAMPLES.values()]
#: No example database: nothing is written outside tests/, and each run explores afresh.
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def decode_only_refuses(data: bytes) -> None:
    """``decode`` either returns a message or raises ProtocolError with a usable reason."""
    try:
        msg, buffers = p.decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert len(exc.reason.encode()) <= 123
    else:
        assert isinstance(msg, p.Message)
        assert all(isinstance(b, memoryview) for b in buffers)


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_only_raises_protocol_error(data: bytes) -> None:
    decode_only_refuses(data)


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes_after_a_valid_prefix(tail: bytes) -> None:
    decode_only_refuses(p.MAGIC + bytes([p.VERSION]) + tail)
    decode_only_refuses(raw(tail))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


@settings(FUZZ, max_examples=700)
@given(mutated_frames())
def test_decode_mutated_valid_frames_only_raises_protocol_error(data: bytes) -> None:
    decode_only_refuses(data)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def plausible_headers(draw: st.DrawFn) -> dict:
    """Headers of a real type whose fields are real names (plus stray str and bytes keys) with
    random msgpack values."""
    kind = draw(st.sampled_from(sorted(p.MESSAGES)))
    names = sorted(p.MESSAGES[kind].SCHEMA)
    keys = st.sampled_from(names) | st.text(max_size=5) | st.binary(max_size=3)
    header = draw(st.dictionaries(keys, MSGPACK_VALUES, max_size=len(names) + 1))
    if draw(st.booleans()):  # start from a valid header and replace a few fields
        base = next((header_of(k) for k in SAMPLES if k == kind), {})
        header = {**base, **header}
    header["t"] = kind
    return header


@settings(FUZZ, max_examples=250)
@given(plausible_headers(), st.lists(st.binary(max_size=4), max_size=3))
def test_decode_random_headers_only_raises_protocol_error(header: dict, buffers: list) -> None:
    decode_only_refuses(frame(header, buffers))
