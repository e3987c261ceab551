"""Refereed delegation (Gensyn's Verde): the checkpoint commitments and the bisection.

A refereed task runs ``state = step(state, i)`` for ``i`` in ``range(start, stop)`` and commits
the state every ``every`` steps. Its payload is ``[args stream, SEGMENT, STATE, ...]``: buffer
:data:`SEGMENT_BUF` is the ASCII ``b"start,stop,every"`` and buffer :data:`STATE_BUF` the
canonical bytes of the starting state; the args stream (the client's step function and its
data) is the same for every run of the task. Its finished result's buffers are ``[stream,
HASHES, STATE_0, ..., STATE_m]``: ``HASHES`` is the SHA-256 of each checkpoint's canonical bytes
(32 bytes each, the start state first) and ``STATE_j`` those bytes. The gateway reads only these
raw bytes, never unpickling any of them: it checks each provider's hashes against its own
checkpoint bytes, anchors checkpoint 0 at the hash of the starting state it relayed, and
compares the two providers' lists.

If they disagree, :func:`divergence` bisects to a segment whose start both committed alike and
whose end they committed differently; the referee runs just that segment, with the same args
stream, from the agreed checkpoint's bytes (whose hash both providers committed, so at least the
honest one's bytes). The provider whose end hash matches the referee's is right.

Must never: trust a checkpoint byte it did not hash itself, or let the client choose the
segment or the state the referee starts from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

SEGMENT_BUF = 1
STATE_BUF = 2
HASH_LEN = 32
#: Steps of one refereed task at most, and checkpoints at most (each is a result buffer and a
#: hash the gateway keeps until the verdict).
MAX_STEPS = 10_000_000
MAX_CHECKPOINTS = 1_000


def checkpoints(start: int, stop: int, every: int) -> list[int]:
    """The steps after which a run of ``[start, stop)`` commits its state (``start``: before
    any step). Segments start at multiples of ``every``, so runs of parts line up."""
    return [start] + [s for s in range(start + 1, stop + 1) if s % every == 0 or s == stop]


def segment_bytes(start: int, stop: int, every: int) -> bytes:
    return f"{start},{stop},{every}".encode("ascii")


def parse_segment(data: bytes) -> tuple[int, int, int]:
    start, stop, every = (int(x) for x in bytes(data).decode("ascii").split(","))
    return start, stop, every


def spec_problem(refereed: dict, redundancy: int, payload: Sequence[memoryview]) -> str | None:
    """Why a refereed task's spec or payload cannot be run, or None."""
    if set(refereed) != {"steps", "every"}:
        return "refereed must be exactly {steps, every}"
    steps, every = refereed["steps"], refereed["every"]
    if not 1 <= steps <= MAX_STEPS or not 1 <= every <= steps:
        return f"refereed needs 1 <= every <= steps <= {MAX_STEPS}"
    if steps // every + (steps % every > 0) > MAX_CHECKPOINTS:
        return f"refereed commits at most {MAX_CHECKPOINTS} checkpoints; raise checkpoint_every"
    if redundancy != 2:
        return "a refereed task runs on exactly two providers (redundancy=2)"
    if len(payload) <= STATE_BUF or bytes(payload[SEGMENT_BUF]) != segment_bytes(0, steps, every):
        return "a refereed task's payload must carry its segment and starting state buffers"
    return None


@dataclass(frozen=True, slots=True)
class Commitment:
    """One run's committed checkpoints: their steps, hashes and canonical bytes."""

    steps: list[int]
    hashes: list[bytes]
    states: list[memoryview]


def commitment(status: str, bufs: Sequence[memoryview], start: int, stop: int, every: int,
               start_hash: bytes) -> Commitment | str:
    """A run's commitment from its result buffers, or why it is no valid commitment (a
    failure, a malformed result, hashes that do not match its own bytes, or a start other than
    the state the gateway relayed)."""
    if status != "finished":
        return f"the run ended {status}"
    steps = checkpoints(start, stop, every)
    if len(bufs) != 2 + len(steps) or bufs[1].nbytes != HASH_LEN * len(steps):
        return f"the result does not carry {len(steps)} checkpoint hashes and states"
    raw = bytes(bufs[1])
    hashes = [raw[i:i + HASH_LEN] for i in range(0, len(raw), HASH_LEN)]
    states = list(bufs[2:])
    for j, (h, s) in enumerate(zip(hashes, states, strict=True)):
        if hashlib.sha256(s).digest() != h:
            return f"checkpoint {j} (step {steps[j]}) does not hash to what the run committed"
    if hashes[0] != start_hash:
        return "the run did not start from the state it was given"
    return Commitment(steps, hashes, states)


def divergence(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """Bisect two hash lists that agree at 0 and differ at the end: an index ``j`` with
    ``a[j-1] == b[j-1]`` and ``a[j] != b[j]`` (the first difference when they never agree again).
    """
    lo, hi = 0, len(a) - 1  # invariant: agree at lo, differ at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid
        else:
            hi = mid
    return hi


def start_hash(payload: Sequence[memoryview]) -> bytes:
    return hashlib.sha256(payload[STATE_BUF]).digest()
