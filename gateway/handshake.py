"""One connection's handshake, sans-I/O: challenge, signed hello, welcome; an explicit table.

A peer proves it holds its account's key by signing a fresh challenge before anything else it
sends is read. The shell (:mod:`gateway.server`) sends the frames this module makes and reports
what happened; every move is checked against :data:`HANDSHAKE_TRANSITIONS` and logged, so a
connection can never be served before it was authenticated, nor after it was closed.
"""

from __future__ import annotations

import logging
import secrets
from enum import StrEnum

from gateway import protocol as p
from gateway.identity import auth_message, verify

log = logging.getLogger(__name__)


class Phase(StrEnum):
    CONNECTED = "connected"  # the socket is open; nothing was said
    CHALLENGED = "challenged"  # a nonce was sent; only a signed hello is read now
    AUTHENTICATED = "authenticated"  # the hello's signature and fields are good
    SERVING = "serving"  # welcomed: its messages reach the core
    CLOSED = "closed"


class Step(StrEnum):
    CHALLENGE = "challenge"
    HELLO = "hello"
    WELCOME = "welcome"
    REFUSE = "refuse"  # a protocol rule was broken: closed with the rule's reason
    LEAVE = "leave"  # the peer went (or the gateway stopped)


HANDSHAKE_TRANSITIONS: dict[Phase, dict[Step, Phase]] = {
    Phase.CONNECTED: {Step.CHALLENGE: Phase.CHALLENGED, Step.LEAVE: Phase.CLOSED},
    Phase.CHALLENGED: {Step.HELLO: Phase.AUTHENTICATED, Step.REFUSE: Phase.CLOSED,
                       Step.LEAVE: Phase.CLOSED},
    Phase.AUTHENTICATED: {Step.WELCOME: Phase.SERVING, Step.REFUSE: Phase.CLOSED,
                          Step.LEAVE: Phase.CLOSED},
    Phase.SERVING: {Step.REFUSE: Phase.CLOSED, Step.LEAVE: Phase.CLOSED},
    Phase.CLOSED: {Step.LEAVE: Phase.CLOSED},
}


class HandshakeError(RuntimeError):
    """A move the table does not allow: a bug in the shell, never a peer's doing."""


class Handshake:
    """The handshake of one connection (``peer`` names it in the log)."""

    def __init__(self, peer: str = "", nonce: bytes | None = None) -> None:
        self.peer = peer
        self.nonce = nonce or secrets.token_bytes(32)
        self.phase = Phase.CONNECTED
        self.hello: p.Hello | None = None

    def move(self, step: Step) -> Phase:
        new = HANDSHAKE_TRANSITIONS[self.phase].get(step)
        if new is None:
            raise HandshakeError(f"connection {self.peer}: {self.phase} cannot take {step}")
        log.debug("connection %s: %s --%s--> %s", self.peer, self.phase, step, new)
        self.phase = new
        return new

    def challenge(self, gateway_key: bytes) -> bytes:
        """The first frame: a fresh nonce to sign, and the gateway's key."""
        self.move(Step.CHALLENGE)
        return p.encode(p.Challenge(nonce=self.nonce, gateway=gateway_key))

    def receive_hello(self, data: bytes | str) -> p.Hello:
        """Check the peer's answer; raises :class:`~gateway.protocol.ProtocolError` (and the
        handshake is closed) when it breaks a rule."""
        try:
            hello = _check_hello(self.nonce, data)
        except p.ProtocolError:
            self.move(Step.REFUSE)
            raise
        self.move(Step.HELLO)
        self.hello = hello
        return hello

    def welcome(self) -> None:
        self.move(Step.WELCOME)

    def refuse(self) -> None:
        self.move(Step.REFUSE)

    def leave(self) -> None:
        self.move(Step.LEAVE)

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING


def _check_hello(nonce: bytes, data: bytes | str) -> p.Hello:
    if isinstance(data, str):
        raise p.ProtocolError(p.ErrorCode.BAD_FRAME, "text frames are not accepted")
    try:
        msg, _ = p.decode(data, allowed=frozenset({"hello"}))
    except p.ProtocolError as exc:
        if exc.code is p.ErrorCode.UNKNOWN_TYPE:
            raise p.ProtocolError(p.ErrorCode.AUTH, "authenticate first: answer the challenge "
                                  "with a signed hello") from None
        raise
    assert isinstance(msg, p.Hello)
    if not verify(msg.key, msg.signature, auth_message(nonce, msg.role)):
        raise p.ProtocolError(p.ErrorCode.AUTH, "bad signature on the challenge")
    if msg.role == "client" and not msg.session:
        raise p.ProtocolError(p.ErrorCode.AUTH, "a client hello needs a session id")
    if msg.role == "provider" and msg.ad is None:
        raise p.ProtocolError(p.ErrorCode.AUTH, "a provider hello needs its advertisement")
    return msg
