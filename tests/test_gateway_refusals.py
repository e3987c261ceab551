"""Acceptance 8 of issue 2: the gateway refuses misbehaving peers with a clear close reason.

Raw websocket connections break one rule each: no hello, a bad signature, garbage, a text frame,
an unknown message type, a wrong field type, an oversized message, silence. Each is closed with a
code and a reason naming the rule, and a well-behaved Client on the same gateway keeps getting
correct results throughout.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, http_get, start_gateway
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from gateway import protocol as p
from gateway.identity import Identity, auth_message
from gateway.server import AUTH_TIMEOUT
from notebook_ext import Client, GatewayRefused

cloudpickle.register_pickle_by_value(sys.modules[__name__])

POLICY = 1008
TOO_BIG = 1009
MAX_MESSAGE_MIB = 1


def add(x, y):
    return x + y


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that accepts messages up to 1 MiB, with one provider of its own."""
    gw = start_gateway(tmp_path_factory.mktemp("refusals"), local_providers=1,
                       extra=("--max-message-mib", str(MAX_MESSAGE_MIB)))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def good_client(small_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Client]:
    with Client(small_gateway.url, home=tmp_path_factory.mktemp("good-client"),
                stream_output=False) as c:
        yield c


@pytest.fixture(autouse=True)
def keeps_serving(good_client: Client, small_gateway: Gateway) -> Iterator[None]:
    """After every refusal, the well-behaved client still gets correct results."""
    assert good_client.submit(add, 1, 2).result(30) == 3
    yield
    assert good_client.submit(add, 20, 22).result(30) == 42
    assert small_gateway.health()["providers"] == 1
    assert small_gateway.proc.poll() is None


class SilentPeer(threading.Thread):
    """Connects, reads the challenge and then says nothing, while the other tests run."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="silent-peer")
        self.url = url
        self.outcome: tuple[int, str, float] | BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.url, compression=None, proxy=None) as ws:
                ws.recv(timeout=10)
                start = time.monotonic()
                try:
                    ws.recv(timeout=AUTH_TIMEOUT + 10)
                except ConnectionClosed as exc:
                    assert exc.rcvd is not None
                    self.outcome = (exc.rcvd.code, exc.rcvd.reason, time.monotonic() - start)
        except BaseException as exc:  # reported by the test that joins us
            self.outcome = exc


@pytest.fixture(scope="module", autouse=True)
def silent_peer(small_gateway: Gateway) -> SilentPeer:
    """Started before this module's first test so its wait for the auth timeout overlaps them."""
    peer = SilentPeer(small_gateway.url)
    peer.start()
    return peer


# --------------------------------------------------------------------------- raw peers


@contextlib.contextmanager
def raw(gw: Gateway) -> Iterator[tuple[ClientConnection, p.Challenge]]:
    """A raw websocket to the gateway, and the challenge it opened with."""
    with connect(gw.url, compression=None, max_size=None, proxy=None, open_timeout=10) as ws:
        challenge, _ = p.decode(ws.recv(timeout=10), allowed=frozenset({"challenge"}))
        assert isinstance(challenge, p.Challenge) and len(challenge.nonce) == 32
        yield ws, challenge


def hello(challenge: p.Challenge, identity: Identity | None = None, role: str = "client",
          sign_role: str | None = None, session: str | None = None, **fields) -> bytes:
    identity = identity or Identity.generate()
    signature = identity.sign(auth_message(challenge.nonce, sign_role or role))
    if session is None:
        session = os.urandom(8).hex() if role == "client" else ""
    return p.encode(p.Hello(role=role, key=identity.public_bytes, signature=signature,
                            session=session, **fields))


@contextlib.contextmanager
def authenticated(gw: Gateway) -> Iterator[ClientConnection]:
    with raw(gw) as (ws, challenge):
        ws.send(hello(challenge))
        welcome, _ = p.decode(ws.recv(timeout=10), allowed=frozenset({"welcome"}))
        assert isinstance(welcome, p.Welcome)
        yield ws


def closed_with(ws: ClientConnection, frame: bytes | str | None = None) -> tuple[int, str]:
    """Send ``frame`` (if any), then read until the gateway closes; its close code and reason."""
    if frame is not None:
        with contextlib.suppress(ConnectionClosed, OSError):
            ws.send(frame)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None, "the connection dropped without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


# --------------------------------------------------------------------------- before the hello


@pytest.mark.parametrize(("build", "prefix"), [
    (lambda: p.encode(p.Cancel(keys=["x"])), "auth"),
    (lambda: p.encode(p.Query(id=1, what="providers")), "auth"),
    (lambda: p.encode(p.Submit(tasks=[], funcs=["f"]), [b"function"]), "auth"),
    (lambda: p.encode(p.Welcome(account="a", session="s", gateway=b"g" * 32)), "auth"),
], ids=["cancel", "query", "submit", "welcome"])
def test_messages_before_the_hello_are_refused_as_unauthenticated(small_gateway: Gateway,
                                                                  build, prefix: str) -> None:
    with raw(small_gateway) as (ws, _):
        code, reason = closed_with(ws, build())
    assert code == POLICY
    assert reason.startswith(f"{prefix}:") and "hello" in reason


def test_bad_signature(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, challenge):
        frame = p.encode(p.Hello(role="client", key=Identity.generate().public_bytes,
                                 signature=os.urandom(64), session="s1"))
        code, reason = closed_with(ws, frame)
    assert (code, reason) == (POLICY, "auth: bad signature on the challenge")


def test_signature_by_another_key(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, challenge):
        real, impostor = Identity.generate(), Identity.generate()
        frame = p.encode(p.Hello(role="client", key=real.public_bytes, session="s1",
                                 signature=impostor.sign(auth_message(challenge.nonce, "client"))))
        code, reason = closed_with(ws, frame)
    assert code == POLICY and reason.startswith("auth: bad signature")


def test_signature_for_another_role(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, challenge):
        code, reason = closed_with(ws, hello(challenge, role="client", sign_role="provider"))
    assert code == POLICY and reason.startswith("auth: bad signature")


def test_replayed_hello_from_an_earlier_connection(small_gateway: Gateway) -> None:
    identity = Identity.generate()
    with raw(small_gateway) as (ws, challenge):
        first = hello(challenge, identity, session="replayed")
        ws.send(first)
        assert isinstance(p.decode(ws.recv(timeout=10))[0], p.Welcome)
    with raw(small_gateway) as (ws, _):
        code, reason = closed_with(ws, first)  # a new challenge: the old signature is worthless
    assert code == POLICY and reason.startswith("auth: bad signature")


def test_client_hello_needs_a_session(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, challenge):
        code, reason = closed_with(ws, hello(challenge, session=""))
    assert code == POLICY and reason.startswith("auth:") and "session" in reason


def test_provider_hello_needs_an_advertisement(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, challenge):
        code, reason = closed_with(ws, hello(challenge, role="provider"))
    assert code == POLICY and reason.startswith("auth:") and "advertisement" in reason


@pytest.mark.parametrize(("frame", "prefix"), [
    (b"garbage", "bad_frame"),
    (b"", "bad_frame"),
    (b"DC\x09\x00\x00\x00\x00", "bad_version"),
    ("a text frame", "bad_frame"),
    (p.encode_frame({"t": "hello", "role": "client", "key": "not bytes"}), "schema"),
], ids=["garbage", "empty", "version", "text", "schema"])
def test_broken_hello_frames(small_gateway: Gateway, frame: bytes | str, prefix: str) -> None:
    with raw(small_gateway) as (ws, _):
        code, reason = closed_with(ws, frame)
    assert code == POLICY
    assert reason.startswith(f"{prefix}:"), reason


def test_oversized_hello(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, _):
        code, _ = closed_with(ws, b"\0" * (MAX_MESSAGE_MIB * 2**20 + 1))
    assert code == TOO_BIG


# --------------------------------------------------------------------------- after the hello

AFTER_HELLO = [
    pytest.param(b"garbage", "bad_frame", id="garbage"),
    pytest.param("a text frame", "bad_frame", id="text"),
    pytest.param(p.encode_frame({"t": "bogus"}), "unknown_type", id="unknown-type"),
    pytest.param(p.encode(p.Heartbeat()), "unknown_type", id="provider-only-type"),
    pytest.param(p.encode(p.Hello(role="client", key=b"k" * 32, signature=b"s" * 64,
                                  session="again")), "unknown_type", id="second-hello"),
    pytest.param(p.encode_frame({"t": "cancel", "keys": "not a list"}), "schema",
                 id="wrong-field-type"),
    pytest.param(p.encode_frame({"t": "query", "id": "1", "what": "providers"}), "schema",
                 id="wrong-integer"),
    pytest.param(p.encode_frame({"t": "cancel", "keys": [], "extra": 1}), "schema",
                 id="unknown-field"),
    pytest.param(p.encode_frame({"t": "cancel", "keys": []}, [b"surplus"]), "schema",
                 id="buffer-count"),
]


def answer_to(ws: ClientConnection, frame: bytes | str) -> p.Error:
    """Send one bad frame; the gateway's ``Error`` about it (the connection stays open)."""
    ws.send(frame)
    msg, _ = p.decode(ws.recv(timeout=10))
    assert isinstance(msg, p.Error), msg
    return msg


def still_served(ws: ClientConnection) -> None:
    ws.send(p.encode(p.Query(id=41, what="providers")))
    reply, _ = p.decode(ws.recv(timeout=10))
    assert isinstance(reply, p.Reply) and reply.id == 41


@pytest.mark.parametrize(("frame", "prefix"), AFTER_HELLO)
def test_a_bad_frame_after_the_hello_is_refused_alone_naming_the_rule(
        small_gateway: Gateway, frame: bytes | str, prefix: str) -> None:
    """One bad frame never ends a connection: it is answered with an Error and dropped."""
    with authenticated(small_gateway) as ws:
        error = answer_to(ws, frame)
        assert error.code == prefix and error.message.startswith("frame dropped"), error
        still_served(ws)


def test_a_peer_that_keeps_sending_garbage_is_closed(small_gateway: Gateway) -> None:
    with authenticated(small_gateway) as ws:
        still_served(ws)
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(200):  # 50 in 10 s are forgiven, one at a time
                answer_to(ws, b"garbage")
    assert info.value.rcvd is not None and info.value.rcvd.code == POLICY
    reason = info.value.rcvd.reason
    assert reason.startswith("bad_frame:") and "bad frames in" in reason, reason


def test_oversized_message_after_the_hello(small_gateway: Gateway) -> None:
    with authenticated(small_gateway) as ws:
        big = p.encode(p.Submit(tasks=[], funcs=["f"]), [b"\0" * (MAX_MESSAGE_MIB * 2**20)])
        code, reason = closed_with(ws, big)
    assert code == TOO_BIG
    assert reason  # websockets says how big it was and what the limit is


def test_a_message_just_under_the_limit_is_served(good_client: Client) -> None:
    payload = b"x" * (MAX_MESSAGE_MIB * 2**20 - 64 * 1024)
    assert good_client.submit(len, payload).result(30) == len(payload)


def test_client_submitting_over_the_limit_is_told_it_is_too_big(small_gateway: Gateway,
                                                                tmp_path: Path) -> None:
    with Client(small_gateway.url, home=tmp_path / "big", stream_output=False,
                reconnect_for=5) as c:
        # refused before anything is sent: the gateway announced its limit at the handshake.
        # (One big buffer would travel apart, cut-through; many small ones fill the frame.)
        with pytest.raises(GatewayRefused) as refused:
            c.map(len, [b"x" * (MAX_MESSAGE_MIB * 2**19)] * 8, chunksize=1)
        assert re.search(r"(?i)too large", str(refused.value)), refused.value
        assert c.submit(len, b"abc").result(30) == 3  # the same client goes on working


def test_session_of_another_account_is_not_handed_over(small_gateway: Gateway,
                                                       good_client: Client) -> None:
    with raw(small_gateway) as (ws, challenge):
        code, reason = closed_with(ws, hello(challenge, session=good_client.session))
    assert code == POLICY and reason.startswith("auth:") and "session" in reason
    # the rightful owner still gets its results on that session
    assert good_client.submit(add, 5, 5).result(30) == 10


def test_refusals_are_counted_in_metrics(small_gateway: Gateway) -> None:
    with raw(small_gateway) as (ws, _):
        closed_with(ws, b"garbage")
    with authenticated(small_gateway) as ws:
        answer_to(ws, b"garbage")
    status, text = http_get(small_gateway.port, "/metrics")
    assert status == 200
    assert 'decompute_frames_refused_total{code="auth"}' in text
    assert 'decompute_frames_refused_total{code="bad_frame"}' in text


def test_no_hello_within_the_auth_timeout(silent_peer: SilentPeer) -> None:
    """Runs last: the silent peer connected before the first test of this module."""
    silent_peer.join(AUTH_TIMEOUT + 15)
    assert not silent_peer.is_alive()
    outcome = silent_peer.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    assert outcome is not None, "the gateway never closed the silent connection"
    code, reason, waited = outcome
    assert code == POLICY
    assert reason.startswith("auth:") and "hello" in reason
    assert AUTH_TIMEOUT - 1 <= waited <= AUTH_TIMEOUT + 5
