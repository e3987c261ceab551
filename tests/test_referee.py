"""``gateway.referee``: checkpoints, commitments and the bisection, with no network."""

from __future__ import annotations

import hashlib

from gateway import referee as rf


def commit(states: list[bytes]) -> list[memoryview]:
    hashes = b"".join(hashlib.sha256(s).digest() for s in states)
    return [memoryview(b"stream"), memoryview(hashes), *(memoryview(s) for s in states)]


def test_checkpoints_line_up_across_segments() -> None:
    assert rf.checkpoints(0, 100, 10) == list(range(0, 101, 10))
    assert rf.checkpoints(30, 40, 10) == [30, 40]
    assert rf.checkpoints(0, 7, 3) == [0, 3, 6, 7]
    assert rf.parse_segment(rf.segment_bytes(5, 9, 2)) == (5, 9, 2)


def test_divergence_bisects_to_an_agreed_start_and_a_disputed_end() -> None:
    a = [bytes([i]) for i in range(11)]
    b = a[:4] + [b"x"] * 7
    assert rf.divergence(a, b) == 4
    assert rf.divergence(a, a[:10] + [b"y"]) == 10
    assert rf.divergence(a, a[:1] + [b"z"] * 10) == 1
    c = a[:3] + [b"q"] + a[4:10] + [b"w"]  # differs at 3, agrees again, differs at the end
    j = rf.divergence(a, c)
    assert a[j - 1] == c[j - 1] and a[j] != c[j]


def test_a_commitment_is_checked_against_its_own_bytes_and_the_relayed_start() -> None:
    states = [b"s0", b"s1", b"s2"]
    start = hashlib.sha256(b"s0").digest()
    made = rf.commitment("finished", commit(states), 0, 2, 1, start)
    assert isinstance(made, rf.Commitment) and made.steps == [0, 1, 2]
    forged = commit(states)
    forged[3] = memoryview(b"other")  # a state that does not hash to what it committed
    assert "does not hash" in rf.commitment("finished", forged, 0, 2, 1, start)
    assert "did not start" in rf.commitment("finished", commit([b"x", b"s1", b"s2"]), 0, 2, 1,
                                            start)
    assert "checkpoint hashes" in rf.commitment("finished", commit(states[:2]), 0, 2, 1, start)
    assert "error" in rf.commitment("error", [], 0, 2, 1, start)


def test_spec_problems() -> None:
    payload = [memoryview(b"s"), memoryview(rf.segment_bytes(0, 10, 5)), memoryview(b"x")]
    assert rf.spec_problem({"steps": 10, "every": 5}, 2, payload) is None
    assert "exactly two" in rf.spec_problem({"steps": 10, "every": 5}, 3, payload)
    assert "segment" in rf.spec_problem({"steps": 20, "every": 5}, 2, payload)
    assert "every" in rf.spec_problem({"steps": 10, "every": 0}, 2, payload)
    assert "exactly" in rf.spec_problem({"steps": 10}, 2, payload)
    assert "checkpoints" in rf.spec_problem({"steps": 10**6, "every": 1}, 2, payload)
