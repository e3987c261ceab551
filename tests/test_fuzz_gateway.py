"""Issue 3, acceptance 5: hostile frames against a live gateway (hypothesis), plus its rate limit.

Raw websocket peers send random and mutated frames: unauthenticated (each frame is the answer to
a fresh challenge), or after a valid signed hello as a client or as a provider. Mutations start
from valid frames of every message type (``gateway.protocol.encode``): flipped bits, truncation,
spliced bytes, a broken prefix, and header-level edits (a field replaced by a value of the wrong
type or range, removed, added; the buffer table or the type tag changed). After each frame the
peer learns whether the gateway kept the connection (a query is answered; after the hello a bad
frame is answered with an ``Error`` and the connection kept) or closed it, and reconnects after a
close. A hostile provider reconnects as a fresh account under a fresh name: the gateway benches an
account whose connections keep dropping what they took, which would starve the fuzz of work.
Throughout, the gateway process stays alive and answers ``/health``,
its memory stays bounded, and a well-behaved ``Client`` gets every result, correct.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import random
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import psutil
import pytest
from conftest import Gateway, http_get, start_gateway, wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway import protocol as p
from gateway.hub import REJOIN_GRACE
from gateway.identity import Identity, auth_message
from gateway.limits import Limits
from notebook_ext import Client, ProviderLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FRAMES_PER_EXAMPLE = 50
EXAMPLES = 110  # 5,500 fuzzed frames
MIN_FRAMES = 5_000
MAX_RSS_GROWTH = 100 * 2**20
RECV_TIMEOUT = 15.0
INTERNAL = 1011


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


# --------------------------------------------------------------------------- seed frames

RUNTIME = p.Runtime(python=".".join(map(str, sys.version_info[:2])),
                    cloudpickle=cloudpickle.__version__)
FUNC_BLOB = cloudpickle.dumps(add, protocol=5)
FUNC_HASH = "fuzz" + os.urandom(8).hex()
ARGS_BLOB = cloudpickle.dumps(((1, 2), {}), protocol=5)
#: Frames carry a header map and buffers; a seed is what a valid frame of that type would hold.
Seed = tuple[dict[str, Any], list[bytes]]


@dataclass
class Context:
    """What a frame may refer to: the connection's challenge, who we are, keys we used."""

    nonce: bytes
    identity: Identity
    role: str  # "anon", "client" or "provider"
    rng: random.Random
    keys: list[str] = field(default_factory=lambda: ["k0"])

    def key(self) -> str:
        if self.rng.random() < 0.5:
            return self.rng.choice(self.keys)
        key = f"fz-{self.rng.getrandbits(32):x}"
        self.keys = [*self.keys[-20:], key]
        return key


def _header(msg: p.Message) -> dict[str, Any]:
    return {"t": msg.TYPE, **msg.to_wire()}


def _ad(ctx: Context) -> p.ProviderAd:
    return p.ProviderAd(name=f"fuzz-{ctx.rng.getrandbits(16)}", cpus=1, memory=2**30,
                        runtime=RUNTIME, sandbox="weak", slots=1)


def seed_hello(ctx: Context) -> Seed:
    role = ctx.rng.choice(["client", "provider"])
    sign_role = role if ctx.rng.random() < 0.9 else ("provider" if role == "client" else "client")
    msg = p.Hello(role=role, key=ctx.identity.public_bytes,
                  signature=ctx.identity.sign(auth_message(ctx.nonce, sign_role)),
                  session=f"{ctx.rng.getrandbits(64):016x}" if role == "client" else "",
                  ad=_ad(ctx) if role == "provider" else None)
    return _header(msg), []


def _spec(ctx: Context, **kw: Any) -> p.TaskSpec:
    return p.TaskSpec(key=kw.pop("key", None) or ctx.key(), func=FUNC_HASH, nb=1,
                      runtime=RUNTIME, resources={"cpus": 1}, **kw)


def seed_submit(ctx: Context) -> Seed:
    specs = [_spec(ctx, redundancy=ctx.rng.choice([1, 1, 2, 3]))
             for _ in range(ctx.rng.randint(1, 3))]
    return _header(p.Submit(tasks=specs, funcs=[FUNC_HASH])), [FUNC_BLOB] + [ARGS_BLOB] * len(specs)


def seed_submit_same_key(ctx: Context) -> Seed:
    key = ctx.key()
    specs = [_spec(ctx, key=key), _spec(ctx, key=key)]
    return _header(p.Submit(tasks=specs, funcs=[FUNC_HASH])), [FUNC_BLOB, ARGS_BLOB, ARGS_BLOB]


def seed_submit_graph(ctx: Context) -> Seed:
    first, second = ctx.key(), ctx.key()
    specs = [_spec(ctx, key=first, deps=[], keep=True),
             _spec(ctx, key=second, deps=[first], keep=True, send=ctx.rng.random() < 0.5)]
    return _header(p.Submit(tasks=specs, funcs=[FUNC_HASH])), [FUNC_BLOB, ARGS_BLOB, ARGS_BLOB]


def seed_query(ctx: Context) -> Seed:
    what = ctx.rng.choice(["balance", "earnings", "providers", "resume", "nonsense"])
    args = {"keys": [ctx.key() for _ in range(3)]} if what == "resume" else {}
    return _header(p.Query(id=ctx.rng.getrandbits(20), what=what, args=args)), []


def seed_keys(kind: type[p.Message]) -> Any:
    def build(ctx: Context) -> Seed:
        return _header(kind(keys=[ctx.key() for _ in range(ctx.rng.randint(0, 3))])), []

    return build


def seed_results(ctx: Context) -> Seed:
    results = [p.Result(key=ctx.key(), status="finished", nb=1, usage={"cpu_seconds": 0.1}),
               p.Result(key=ctx.key(), status="error",
                        error=p.RemoteFailure(type="ValueError", module="builtins", message="x"))]
    return _header(p.Results(results=results)), [cloudpickle.dumps(3)]


def seed_events(ctx: Context) -> Seed:
    events = [p.Event(key=ctx.key(), kind="running"),
              p.Event(key=ctx.key(), kind="output", stream="stdout", text="hi\n")]
    return _header(p.Events(events=events)), []


def seed_heartbeat(ctx: Context) -> Seed:
    msg = p.Heartbeat(load={"cpu": 0.5}, usage={ctx.key(): {"cpu_seconds": 1.0}})
    return _header(msg), []


def seed_data(ctx: Context) -> Seed:
    return _header(p.Data(keys=[ctx.key()], nbs=[1], missing=[ctx.key()])), [b"\x80\x05K\x01."]


def seed_foreign(ctx: Context) -> Seed:
    """Types no peer may send to the gateway."""
    msg = ctx.rng.choice([
        p.Challenge(nonce=ctx.nonce, gateway=b"g" * 32),
        p.Welcome(account="a" * 64, session="s", gateway=b"g" * 32),
        p.Reply(id=1, data={"x": [1, 2]}),
        p.Error(code="internal", message="boo"),
        p.Assign(tasks=[p.Assignment(key=ctx.key(), func=FUNC_HASH, nb=0, account="a")],
                 funcs=[]),
    ])
    return _header(msg), []


SEEDS = {
    "hello": seed_hello, "submit": seed_submit, "submit-same-key": seed_submit_same_key,
    "submit-graph": seed_submit_graph, "query": seed_query, "cancel": seed_keys(p.Cancel),
    "fetch": seed_keys(p.Fetch), "release": seed_keys(p.Release), "results": seed_results,
    "events": seed_events, "heartbeat": seed_heartbeat, "data": seed_data,
    "foreign": seed_foreign,
}
#: Mostly what the role may send (so mutations reach the schema and the hub), some of the rest.
ROLE_SEEDS = {
    "anon": ["hello"] * 8 + ["submit", "query", "results", "foreign"],
    "client": ["submit"] * 3 + ["submit-graph"] * 2 + ["query"] * 2 + [
        "submit-same-key", "cancel", "fetch", "release", "results", "hello", "foreign"],
    "provider": ["results"] * 4 + ["events"] * 2 + ["heartbeat"] * 3 + ["data"] * 2 + [
        "query", "submit", "hello", "foreign"],
}

# --------------------------------------------------------------------------- mutations

NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, -1e300,
    float("nan"), float("inf"), "", "x" * 300, "\x00", "é☃", "../../etc/passwd", b"", b"\0" * 32,
    b"\xff" * 64, [], [1, "a", None], [[[[]]]], list(range(200)), {}, {"k": 1}, {"": None},
    {"cpus": -1}, {"memory": 2**62}, {"keys": 5}, {"keys": [1, 2]}, {"keys": None},
    "client", "provider", "finished", "error", "cancelled", "resume", "balance", "submit",
    "results", "hello", "data", "running", "output",
]
PREFIX = struct.Struct("!2sBI")


def nasty(rng: random.Random, *more: Any) -> Any:
    """A fresh copy of a hostile value (mutations nest values: never share one)."""
    return copy.deepcopy(rng.choice([*NASTY, *more]))


def pack(header: Any, buffers: list[bytes], table: Any = None) -> bytes:
    """A frame with an arbitrary header object; ``table`` overrides the buffer-length table."""
    if isinstance(header, dict):
        header = dict(header, b=[len(b) for b in buffers] if table is None else table)
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(p.MAGIC, p.VERSION, len(packed)) + packed + b"".join(buffers)


def _slots(obj: Any, depth: int = 0) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) pair inside ``obj``, to pick a place to mutate."""
    found: list[tuple[Any, Any]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
        obj, list) else ()
    for k, v in items:
        found.append((obj, k))
        if depth < 5:
            found += _slots(v, depth + 1)
    return found


def mutate_header(header: dict[str, Any], buffers: list[bytes], rng: random.Random) -> bytes:
    header = msgpack.unpackb(msgpack.packb(header, use_bin_type=True), raw=False)  # deep copy
    table: Any = None
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        slots = _slots(header)
        if op < 0.08:
            table = nasty(rng, [1], [10**9], [len(b) + 1 for b in buffers])
        elif op < 0.12:
            header = nasty(rng)
            break
        elif op < 0.2 and isinstance(header, dict):
            header["t"] = nasty(rng, *p.MESSAGES)
        elif op < 0.35 and slots:
            container, k = rng.choice(slots)
            if isinstance(container, dict):
                del container[k]
            else:
                container.pop(k)
        elif op < 0.45 and slots:
            container, _ = rng.choice(slots)
            if isinstance(container, dict):
                container[rng.choice(["zz", "key", "b", "t", "nb", "deps"])] = nasty(rng)
            else:  # a repeated element (a task, a result, a key) or a hostile one
                container.append(nasty(rng, *container))
        elif slots:
            container, k = rng.choice(slots)
            container[k] = nasty(rng)
    if rng.random() < 0.2 and buffers:
        buffers = buffers[:-1] if rng.random() < 0.5 else [*buffers, b"extra"]
    return pack(header, buffers, table)


def mutate_bytes(frame: bytes, kind: str, raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "splice":
        i = rng.randrange(len(data) + 1)
        data[i:i + rng.randint(0, 4)] = raw
    elif kind == "extend":
        data += raw
    elif kind == "prefix":
        field_ = rng.choice(["magic", "version", "length"])
        if field_ == "magic":
            data[0:2] = raw[:2].ljust(2, b"X")
        elif field_ == "version":
            data[2] = rng.choice([0, 2, 255, rng.randrange(256)])
        else:
            data[3:7] = struct.pack("!I", rng.choice([0, 1, 2**31, 2**32 - 1, len(data),
                                                      rng.getrandbits(32)]))
    return bytes(data)


MUTATIONS = ["none"] * 4 + ["header"] * 6 + [
    "bitflip", "truncate", "splice", "extend", "prefix", "random", "msgpack", "text"]


@dataclass(frozen=True)
class Recipe:
    """One fuzzed frame, drawn by hypothesis, built against a live connection's context."""

    seed: int  # which of the role's seeds
    mutation: str
    entropy: int
    raw: bytes

    def build(self, ctx: Context) -> bytes | str:
        rng = random.Random(self.entropy)
        ctx.rng = rng
        if self.mutation == "random":
            return self.raw
        if self.mutation == "text":
            return self.raw.decode("latin-1")
        if self.mutation == "msgpack":
            return pack(rng.choice(NASTY), [])
        names = ROLE_SEEDS[ctx.role]
        header, buffers = SEEDS[names[self.seed % len(names)]](ctx)
        if self.mutation == "header":
            return mutate_header(header, buffers, rng)
        frame = pack(header, buffers)
        return frame if self.mutation == "none" else mutate_bytes(frame, self.mutation, self.raw,
                                                                  rng)


recipes = st.builds(Recipe, st.integers(0, 255), st.sampled_from(MUTATIONS),
                    st.integers(0, 2**32 - 1), st.binary(max_size=64))

# --------------------------------------------------------------------------- raw peers


@dataclass
class Tally:
    frames: int = 0
    connections: int = 0
    kept: int = 0
    closes: Counter = field(default_factory=Counter)  # (code, reason's rule) -> count
    internal: list[str] = field(default_factory=list)  # frames that made the gateway fail

    def closed(self, exc: ConnectionClosed, frame: bytes | str) -> None:
        assert exc.rcvd is not None, "the gateway dropped a connection without a close frame"
        rule = exc.rcvd.reason.split(":", 1)[0]
        self.closes[(exc.rcvd.code, rule)] += 1
        if exc.rcvd.code == INTERNAL:
            self.internal.append(f"{exc.rcvd.reason} <- {frame!r:.300}")


class Peer:
    """A raw websocket peer of one role that reconnects (and re-authenticates) after a close.

    A provider peer gets real work: right after each (re)connection, ``feed`` (a well-behaved
    client) submits tasks pinned to it, so its fuzzed results, events and heartbeats can name
    task ids the gateway really assigned to it.
    """

    probe_ids = itertools.count(2**40)

    def __init__(self, url: str, role: str, identity: Identity, tally: Tally,
                 feed: Any = None) -> None:
        self.url = url
        self.role = role
        self.identity = identity
        self.tally = tally
        self.feed = feed
        self.name = f"fuzz-provider-{os.urandom(3).hex()}"
        self.ws: ClientConnection | None = None
        self.ctx: Context | None = None

    def _open(self) -> tuple[ClientConnection, Context]:
        if self.role == "provider":  # a fresh account (and name): never benched for our drops
            self.identity = Identity.generate()
            self.name = f"fuzz-provider-{os.urandom(3).hex()}"
        ws = connect(self.url, compression=None, max_size=None, proxy=None, open_timeout=10,
                     close_timeout=5, legacy=True)
        self.tally.connections += 1
        challenge, _ = p.decode(ws.recv(timeout=RECV_TIMEOUT), allowed=frozenset({"challenge"}))
        assert isinstance(challenge, p.Challenge)
        ctx = Context(challenge.nonce, self.identity, self.role, random.Random(0))
        if self.role == "anon":
            return ws, ctx
        ad = None
        if self.role == "provider":  # it charges, so its fuzzed usage reaches the ledger
            ad = p.ProviderAd(name=self.name, cpus=4, memory=2**30, runtime=RUNTIME, slots=4,
                              prices={"cpu": 0.5, "memory": 0.25})
        ws.send(p.encode(p.Hello(
            role=self.role, key=self.identity.public_bytes, ad=ad,
            session=os.urandom(8).hex() if self.role == "client" else "",
            signature=self.identity.sign(auth_message(challenge.nonce, self.role)))))
        self._until(ws, ctx, lambda m: isinstance(m, p.Welcome))
        if self.role == "provider" and self.feed is not None:
            self.feed(self.name)
            self._until(ws, ctx, lambda m: isinstance(m, p.Assign))
        return ws, ctx

    def _until(self, ws: ClientConnection, ctx: Context, want: Any) -> p.Message:
        while True:
            msg, _ = p.decode(ws.recv(timeout=RECV_TIMEOUT))
            if isinstance(msg, p.Assign):  # real task ids, for the fuzzed reports
                ctx.keys = [*ctx.keys[-20:], *(t.key for t in msg.tasks)]
            if want(msg):
                return msg

    def send(self, recipe: Recipe) -> None:
        """Send one fuzzed frame and learn its fate: the connection kept, or closed."""
        if self.ws is None:
            self.ws, self.ctx = self._open()
        assert self.ctx is not None
        ws, ctx = self.ws, self.ctx
        frame = recipe.build(ctx)
        self.tally.frames += 1
        try:
            ws.send(frame)
            if self.role == "anon":  # the frame was the answer to the challenge
                msg = self._until(ws, ctx, lambda m: True)
                assert isinstance(msg, p.Welcome), msg
                self.tally.kept += 1
                self.close()
                return
            probe = next(self.probe_ids)
            ws.send(p.encode(p.Query(id=probe, what="providers")))
            self._until(ws, ctx, lambda m: isinstance(m, p.Reply) and m.id == probe)
            self.tally.kept += 1
        except ConnectionClosed as exc:
            self.tally.closed(exc, frame)
            self.close()

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("fuzz"), local_providers=2)
    yield gw
    gw.stop()


def metric(gw: Gateway, name: str) -> dict[str, float]:
    status, text = http_get(gw.port, "/metrics")
    assert status == 200
    found = re.findall(rf"^decompute_{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    return {labels: float(value) for labels, value in found}


# --------------------------------------------------------------------------- the property


def test_gateway_survives_5000_hostile_frames(fuzz_gateway: Gateway, tmp_path: Path) -> None:
    gw = fuzz_gateway
    gateway_ps = psutil.Process(gw.proc.pid)
    local = gw.health()["provider_names"]
    identities = {role: Identity.generate() for role in ("anon", "client", "provider")}
    tally = Tally()
    futures: list[Any] = []  # the good client's, all pinned to the gateway's own providers
    fed: list[Any] = []  # tasks given to hostile providers: they must end, one way or another
    with Client(gw.url, home=tmp_path / "good", stream_output=False) as good, \
            Client(gw.url, home=tmp_path / "feeder", stream_output=False) as feeder:
        assert good.submit(square, 3, providers=local).result(60) == 9

        def feed(name: str) -> None:
            fed.extend(feeder.submit(add, i, 1, providers=[name], retries=0, budget=5.0)
                       for i in range(2))
            # and a replicated task: one replica on the hostile provider, one on a good one
            fed.append(feeder.submit(add, 9, 1, providers=[name, *local], redundancy=2,
                                     retries=0, budget=5.0))

        rss_before = gateway_ps.memory_info().rss
        started = time.monotonic()

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],  # no shrinking against a live peer
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(role=st.sampled_from(["anon", "client", "client", "provider", "provider"]),
               batch=st.lists(recipes, min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
        def hostile_batch(role: str, batch: list[Recipe]) -> None:
            futures.append(good.submit(square, len(futures), providers=local))
            peer = Peer(gw.url, role, identities[role], tally, feed)
            try:
                for recipe in batch:
                    peer.send(recipe)
                    assert gw.proc.poll() is None, f"gateway died after {recipe}"
            finally:
                peer.close()
            assert http_get(gw.port, "/health")[0] == 200
            if len(futures) > 1:  # the good client keeps getting results while we fuzz
                assert futures[-2].result(60) == (len(futures) - 2) ** 2

        hostile_batch()
        fuzz_seconds = time.monotonic() - started
        assert [f.result(60) for f in futures] == [i * i for i in range(len(futures))]
        assert good.submit(add, 40, 2, providers=local).result(60) == 42
        # every task a hostile provider took ended (a result, or ProviderLost once it left)
        # (pinned to a provider that left, a task waits REJOIN_GRACE for it to come back)
        unfinished = [f for f in fed if not f.done()]
        deadline = time.monotonic() + REJOIN_GRACE + 30
        with contextlib.suppress(TimeoutError):
            for f in unfinished:
                f.exception(timeout=max(0.1, deadline - time.monotonic()))
        assert all(f.done() for f in fed), [f for f in fed if not f.done()][:5]
    rss_after = gateway_ps.memory_info().rss
    print(f"\nfuzz: {tally.frames} frames over {tally.connections} connections in "
          f"{fuzz_seconds:.1f} s; {tally.kept} kept the connection open; {len(fed)} tasks fed "
          f"to hostile providers; gateway RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB")
    for (code, rule), n in sorted(tally.closes.items(), key=lambda kv: -kv[1]):
        print(f"  closed {code} {rule}: {n}")
    assert tally.frames >= MIN_FRAMES
    assert gw.proc.poll() is None
    assert gw.health()["providers"] == len(local)
    assert rss_after - rss_before < MAX_RSS_GROWTH
    assert not tally.internal, "frames that hit a gateway bug (1011):\n" + "\n".join(
        tally.internal[:10])
    assert metric(gw, "frames_refused_total").get('{code="internal"}', 0) == 0


# --------------------------------------------------------------------------- rate limit


def test_message_rate_limit_slows_the_sender_and_drops_nothing(fuzz_gateway: Gateway) -> None:
    limits = Limits()
    burst = int(limits.burst)
    count = burst + 3 * int(limits.messages_per_second)  # a full burst, then 3 s worth more
    identity = Identity.generate()
    with connect(fuzz_gateway.url, compression=None, max_size=None, proxy=None,
                 open_timeout=10, legacy=False) as ws:
        challenge, _ = p.decode(ws.recv(timeout=10), allowed=frozenset({"challenge"}))
        ws.send(p.encode(p.Hello(role="client", key=identity.public_bytes,
                                 session=os.urandom(8).hex(),
                                 signature=identity.sign(auth_message(challenge.nonce,
                                                                      "client")))))
        assert isinstance(p.decode(ws.recv(timeout=10))[0], p.Welcome)
        cheap = p.encode(p.Cancel(keys=[]))
        started = time.monotonic()
        for _ in range(count):
            ws.send(cheap)
        sent_in = time.monotonic() - started
        ws.send(p.encode(p.Query(id=7, what="balance")))
        warnings, reply = [], None
        while reply is None:
            msg, _ = p.decode(ws.recv(timeout=30))
            if isinstance(msg, p.Error):
                warnings.append(msg)
            elif isinstance(msg, p.Reply) and msg.id == 7:
                reply = msg
        elapsed = time.monotonic() - started
    if not warnings and count / sent_in < limits.burst / 2 + limits.messages_per_second:
        pytest.skip(f"this machine cannot outrun the limit: it sent {count} messages in "
                    f"{sent_in:.2f} s, within what the token bucket allows")
    assert [w.code for w in warnings] == [p.ErrorCode.RATE.value]  # told once
    assert "messages/s" in warnings[0].message and "batch" in warnings[0].message
    assert reply.error is None  # nothing was dropped: the last message was still answered
    # past the burst the gateway read at about the configured rate
    assert elapsed >= (count - burst) / limits.messages_per_second * 0.8
    assert fuzz_gateway.proc.poll() is None


# --------------------------------------------------------------------------- what the fuzz found


@contextlib.contextmanager
def raw_peer(gw: Gateway, role: str, ad: p.ProviderAd | None = None
             ) -> Iterator[ClientConnection]:
    identity = Identity.generate()
    with connect(gw.url, compression=None, max_size=None, proxy=None, open_timeout=10,
                 legacy=False) as ws:
        challenge, _ = p.decode(ws.recv(timeout=10), allowed=frozenset({"challenge"}))
        ws.send(p.encode(p.Hello(role=role, key=identity.public_bytes, ad=ad,
                                 session=os.urandom(8).hex() if role == "client" else "",
                                 signature=identity.sign(auth_message(challenge.nonce, role)))))
        assert isinstance(p.decode(ws.recv(timeout=10))[0], p.Welcome)
        yield ws


def test_a_result_repeated_in_one_message_loses_no_task(fuzz_gateway: Gateway,
                                                        tmp_path: Path) -> None:
    name = f"repeater-{os.urandom(3).hex()}"
    ad = p.ProviderAd(name=name, cpus=1, memory=2**30, runtime=RUNTIME, slots=1)
    with raw_peer(fuzz_gateway, "provider", ad) as ws, \
            Client(fuzz_gateway.url, home=tmp_path / "c", stream_output=False) as client:
        fut = client.submit(add, 1, 2, providers=[name], retries=0)
        while not isinstance(msg := p.decode(ws.recv(timeout=10))[0], p.Assign):
            pass
        task_id = msg.tasks[0].key
        ws.send(p.encode(p.Results(results=[
            p.Result(key=task_id, status="finished", nb=1),
            p.Result(key=task_id, status="error",
                     error=p.RemoteFailure(type="ValueError", module="builtins", message="x")),
        ]), [cloudpickle.dumps(3, protocol=5)]))
        assert fut.result(10) == 3  # the first report counts; the repeat is dropped
    assert metric(fuzz_gateway, "frames_refused_total").get('{code="internal"}', 0) == 0


def test_a_key_repeated_in_one_batch_is_refused_as_in_use(fuzz_gateway: Gateway) -> None:
    spec = p.TaskSpec(key="twice", func=FUNC_HASH, nb=1, runtime=RUNTIME)
    with raw_peer(fuzz_gateway, "client") as ws:
        ws.send(p.encode(p.Submit(tasks=[spec, spec], funcs=[FUNC_HASH]),
                         [FUNC_BLOB, ARGS_BLOB, ARGS_BLOB]))
        outcomes = []
        while len(outcomes) < 2:
            msg, _ = p.decode(ws.recv(timeout=30))
            if isinstance(msg, p.Results):
                outcomes += msg.results
    refused = [r for r in outcomes if r.status == "error"]
    assert [r.status for r in outcomes].count("finished") == 1
    assert len(refused) == 1
    assert refused[0].code == p.ErrorCode.SCHEMA.value
    assert "already in use" in refused[0].error.message


@pytest.fixture(scope="module")
def vote_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A fresh gateway: no provider has a run of valid results yet, so every vote is counted."""
    gw = start_gateway(tmp_path_factory.mktemp("votes"), local_providers=1)
    yield gw
    gw.stop()


def _provider_ad(name: str) -> p.ProviderAd:
    return p.ProviderAd(name=name, cpus=1, memory=2**30, runtime=RUNTIME, slots=1)


def _assigned(ws: ClientConnection) -> p.Assign:
    while not isinstance(msg := p.decode(ws.recv(timeout=10))[0], p.Assign):
        pass
    return msg


def test_a_vote_whose_replicas_are_all_lost_fails_with_provider_lost(
        vote_gateway: Gateway, tmp_path: Path) -> None:
    names = [f"vanishing-{i}-{os.urandom(3).hex()}" for i in range(2)]
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(Client(vote_gateway.url, home=tmp_path / "c",
                                            stream_output=False))
        peers = [stack.enter_context(raw_peer(vote_gateway, "provider", _provider_ad(n)))
                 for n in names]
        fut = client.submit(add, 1, 2, providers=names, redundancy=2, retries=0)
        for ws in peers:
            _assigned(ws)
        for ws in peers:  # both providers vanish
            ws.close()
        with pytest.raises(ProviderLost):
            fut.result(5)
    assert metric(vote_gateway, "frames_refused_total").get('{code="internal"}', 0) == 0


def test_a_vote_with_one_replica_lost_still_ends(vote_gateway: Gateway, tmp_path: Path) -> None:
    local = vote_gateway.health()["provider_names"][0]
    name = f"vanishing-{os.urandom(3).hex()}"
    with raw_peer(vote_gateway, "provider", _provider_ad(name)) as ws, \
            Client(vote_gateway.url, home=tmp_path / "c", stream_output=False) as client:
        fut = client.submit(add, 1, 2, providers=[name, local], redundancy=2, retries=0)
        _assigned(ws)
        # the honest replica has finished: only the vanishing provider's replica still runs
        wait_for(lambda: vote_gateway.health()["tasks"]["running"] == 1, 30,
                 message="the honest replica finished")
        ws.close()
        fut.exception(timeout=5)  # TimeoutError here: the future hangs
        assert fut.done()  # 3 (the one result left) or a clear error, but an answer
