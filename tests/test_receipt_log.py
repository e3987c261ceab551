"""gateway/receipt_log.py on a real SQLite file: batches in, receipts that verify offline out; and
the attacks: a forked or rolled-back head, an edited, deleted or rewritten row, a killed writer.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from inspect import getsource
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import merkle
from gateway.identity import Identity
from gateway.receipt_log import (
    MAX_ENTRIES_PER_READ,
    EntryError,
    ForkDetected,
    HeadWitness,
    LogCorrupted,
    ReceiptInvalid,
    ReceiptLog,
    ReceiptLogError,
    TreeHead,
    check_exported_log,
    check_head_consistency,
    check_log_receipt,
    decode_entry,
    log_http,
    money_in,
    settlement_entry,
    verify_log_receipt,
)

REPO = Path(__file__).resolve().parent.parent


def entry(i: int, *, paid: int = 900, fee: int = 100, client: str = "c1") -> bytes:
    """A redundancy-2 settlement: two ballots, the second provider out-voted and unpaid."""
    return settlement_entry(
        task_id=f"task-{i}", client=client, function_hash="f" * 16, input_hash=f"in{i}",
        providers=[
            {"account": "p1", "result_hash": "r-good", "usage": {"cpu_seconds": 0.25 * i},
             "prices": {"cpu": 0.5}, "paid_micro": paid},
            {"account": "p2", "result_hash": "r-bad", "usage": {"cpu_seconds": 1},
             "prices": {"cpu": 0.5}, "paid_micro": 0},
        ],
        outcome="r-good", amount_micro=paid + fee, fee_micro=fee, time_ms=1_700_000_000_000 + i)


@pytest.fixture
def gateway() -> Identity:
    return Identity.generate()


@pytest.fixture
def rlog(tmp_path: Path) -> ReceiptLog:
    with ReceiptLog(tmp_path / "gateway.db") as opened:
        yield opened


# -- leaf entries -------------------------------------------------------------------------------

def test_entry_is_canonical_json_that_adds_up() -> None:
    data = entry(3)
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    settled = decode_entry(data)
    assert settled["amount_micro"] == settled["fee_micro"] + sum(
        p["paid_micro"] for p in settled["providers"])
    assert [p["result_hash"] for p in settled["providers"]] == ["r-good", "r-bad"]
    # numpy scalars from metering encode as plain numbers, one spelling
    numpy_usage = settlement_entry(
        task_id="t", client="c", function_hash="f", input_hash="i", outcome="r",
        providers=[{"account": "p", "result_hash": "r", "usage": {"cpu_seconds": np.float64(2.5)},
                    "prices": {"cpu": np.int64(1)}, "paid_micro": 5}],
        amount_micro=5, fee_micro=0, time_ms=1)
    assert b'"usage":{"cpu_seconds":2.5}' in numpy_usage and b'"prices":{"cpu":1}' in numpy_usage


def test_entries_that_could_not_verify_are_refused() -> None:
    with pytest.raises(EntryError, match="amount_micro 1001 != fee_micro 100"):
        settlement_entry(task_id="t", client="c", function_hash="f", input_hash="i",
                         outcome="r", providers=[{"account": "p", "result_hash": "r", "usage": {},
                                                  "prices": {}, "paid_micro": 900}],
                         amount_micro=1001, fee_micro=100, time_ms=1)
    with pytest.raises(EntryError, match="providers must be a non-empty list"):
        settlement_entry(task_id="t", client="c", function_hash="f", input_hash="i",
                         outcome="r", providers=[], amount_micro=0, fee_micro=0, time_ms=1)
    twice = {"account": "p", "result_hash": "r", "usage": {}, "prices": {}, "paid_micro": 1}
    with pytest.raises(EntryError, match="distinct accounts"):
        settlement_entry(task_id="t", client="c", function_hash="f", input_hash="i",
                         outcome="r", providers=[twice, twice], amount_micro=2, fee_micro=0,
                         time_ms=1)
    spaced = json.dumps(json.loads(entry(1)), sort_keys=True).encode()
    with pytest.raises(EntryError, match="canonical"):
        decode_entry(spaced)
    with pytest.raises(EntryError, match="not JSON"):
        decode_entry(b"\xff")


# -- batches, heads, proofs ----------------------------------------------------------------------

def test_batches_append_and_every_receipt_verifies_offline(rlog: ReceiptLog,
                                                           gateway: Identity) -> None:
    reference, key = merkle.MerkleTree(), gateway.public_bytes
    for batch in (1, 7, 32, 100, 3):
        entries = [entry(reference.size + i) for i in range(batch)]
        first = rlog.append(entries)
        assert first == reference.size
        for e in entries:
            reference.append(e)
        head = rlog.sign_head(gateway)
        assert (head.size, head.root) == (reference.size, reference.root())
        receipts = rlog.receipts(first, first + batch)
        assert [r["index"] for r in receipts] == list(range(first, first + batch))
        for receipt in receipts:
            settled = check_log_receipt(receipt, key)
            assert settled["task_id"] == f"task-{receipt['index']}"
            assert verify_log_receipt(json.loads(json.dumps(receipt)), key.hex())
    n = reference.size
    for index, size in [(0, 1), (0, n), (n - 1, n), (50, 77), (40, 41)]:
        assert rlog.inclusion(index, size) == reference.inclusion_proof(index, size)
    for first, second in [(0, n), (1, n), (8, 40), (40, 41), (n, n)]:
        proof = rlog.consistency(first, second)
        assert proof == reference.consistency_proof(first, second)
        merkle.verify_consistency(first, second, rlog.root(first), rlog.root(second), proof)
    assert rlog.entries(10, 13) == [entry(10), entry(11), entry(12)]
    rlog.check(key)


def test_a_head_signed_at_m_stays_consistent_with_later_heads(rlog: ReceiptLog,
                                                               gateway: Identity) -> None:
    key = gateway.public_bytes
    rlog.append([entry(i) for i in range(5)])
    old = rlog.sign_head(gateway, now_ms=1000)
    old_receipt = rlog.receipt(3)
    assert rlog.sign_head(gateway, now_ms=5000) == old  # no new leaf: the same head, not a new one
    rlog.append([entry(i) for i in range(5, 12)])
    new = rlog.sign_head(gateway, now_ms=999)  # a clock that stepped back never reorders heads
    assert new.time_ms == 1000 and rlog.heads() == [old, new]
    check_head_consistency(old, new, rlog.consistency(old.size, new.size), key)
    # the receipt issued under the old head still verifies, and its leaf is in the new tree
    check_log_receipt(old_receipt, key)
    merkle.verify_inclusion(merkle.hash_leaf(entry(3)), 3, new.size, rlog.inclusion(3, new.size),
                            new.root)


def test_a_forked_or_rolled_back_head_is_caught_naming_both(tmp_path: Path,
                                                            gateway: Identity) -> None:
    """The attack: the gateway (same key) shows one client a history and later another."""
    key = gateway.public_bytes
    with ReceiptLog(tmp_path / "honest.db") as honest, ReceiptLog(tmp_path / "fork.db") as fork:
        honest.append([entry(i) for i in range(6)])
        seen = honest.sign_head(gateway)
        fork.append([entry(i) for i in range(5)] + [entry(5, paid=1, fee=1)])  # leaf 5 rewritten
        fork.append([entry(i) for i in range(6, 9)])
        forked = fork.sign_head(gateway)
        with pytest.raises(ForkDetected, match=r"head \(size 9.*does not extend.*head \(size 6"):
            check_head_consistency(seen, forked, fork.consistency(6, 9), key)
        with pytest.raises(ForkDetected, match="went back"):
            check_head_consistency(forked, seen, [], key)
        same_size = TreeHead(6, fork.root(6), seen.time_ms + 1, b"")
        same_size = TreeHead(6, same_size.root, same_size.time_ms,
                             gateway.sign(same_size.message()))
        with pytest.raises(ForkDetected, match="a fork"):
            check_head_consistency(seen, same_size, [], key)
        with pytest.raises(Exception, match="not signed by"):
            check_head_consistency(seen, forked, fork.consistency(6, 9),
                                   Identity.generate().public_bytes)


def test_a_client_witness_catches_a_fork_served_later(tmp_path: Path, gateway: Identity) -> None:
    """The client's side: remember the newest head, check every other one against it."""
    key = gateway.public_bytes
    with ReceiptLog(tmp_path / "honest.db") as honest, ReceiptLog(tmp_path / "fork.db") as fork:
        honest.append([entry(i) for i in range(4)])
        h4 = honest.sign_head(gateway)
        honest.append([entry(i) for i in range(4, 9)])
        h9 = honest.sign_head(gateway)
        witness = HeadWitness(key)
        witness.observe(h4)
        assert witness.needs_proof(h9) == (4, 9)
        witness.observe(h9, honest.consistency(4, 9))
        witness.observe(h4, honest.consistency(4, 9))  # an older receipt's head: a prefix
        assert witness.newest == h9 and witness.needs_proof(h9) is None

        fork.append([entry(i) for i in range(3)] + [entry(3, client="someone-else")])
        fork.append([entry(i) for i in range(4, 12)])
        f12 = fork.sign_head(gateway)
        with pytest.raises(ForkDetected, match=r"head \(size 12.*does not extend.*head \(size 9"):
            witness.observe(f12, fork.consistency(9, 12))
        assert witness.newest == h9  # the forked head is never adopted
        with pytest.raises(ReceiptLogError, match="not signed by"):
            HeadWitness(Identity.generate().public_bytes).observe(h4)


def test_the_money_in_the_leaves_adds_up_per_account(rlog: ReceiptLog,
                                                     gateway: Identity) -> None:
    rlog.append([entry(i) for i in range(10)] + [entry(10, paid=50, fee=5, client="c2")])
    totals = money_in(rlog.entries(0, 11))
    assert totals == {"leaves": 11, "spent": {"c1": 10_000, "c2": 55},
                      "earned": {"p1": 9_050, "p2": 0}, "fees_micro": 1_005}
    assert sum(totals["spent"].values()) == sum(totals["earned"].values()) + totals["fees_micro"]
    with pytest.raises(EntryError, match="leaf 1: "):
        money_in([entry(0), b"{}"])


def test_an_exported_log_is_audited_offline(rlog: ReceiptLog, gateway: Identity) -> None:
    key = gateway.public_bytes
    rlog.append([entry(i) for i in range(6)])
    h6 = rlog.sign_head(gateway)
    rlog.append([entry(i) for i in range(6, 13)])
    h13 = rlog.sign_head(gateway)
    exported = [e.decode() for e in rlog.entries(0, 13)]
    tree = check_exported_log(exported, [h6, h13], key)
    assert tree.root() == h13.root
    with pytest.raises(LogCorrupted, match=r"signed head \(size 6.*does not match"):
        check_exported_log(exported[:2] + exported[3:], [h6, h13], key)  # a leaf deleted
    with pytest.raises(LogCorrupted, match="covers more leaves than the 12 exported"):
        check_exported_log(exported[:12], [h13], key)


def test_an_empty_log_has_a_signed_empty_head(rlog: ReceiptLog, gateway: Identity) -> None:
    head = rlog.sign_head(gateway)
    assert (head.size, head.root) == (0, merkle.EMPTY_ROOT)
    rlog.append([entry(0)])
    check_head_consistency(head, rlog.sign_head(gateway), rlog.consistency(0, 1),
                           gateway.public_bytes)
    with pytest.raises(ReceiptLogError, match="root must be a hex str"):
        TreeHead.from_json({**head.to_json(), "root": "zz"})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.data())
def test_the_stored_log_answers_like_the_reference_tree(batches: list[int],
                                                        data: st.DataObject) -> None:
    gateway, reference = Identity.generate(), merkle.MerkleTree()
    with tempfile.TemporaryDirectory() as tmp, ReceiptLog(Path(tmp) / "g.db") as rlog:
        heads = []
        for batch in batches:
            entries = [entry(reference.size + i) for i in range(batch)]
            assert rlog.append(entries) == reference.size
            for e in entries:
                reference.append(e)
            heads.append(rlog.sign_head(gateway))
        n = reference.size
        size = data.draw(st.integers(1, n))
        index = data.draw(st.integers(0, size - 1))
        first = data.draw(st.integers(0, n))
        assert rlog.root(size) == reference.root(size)
        assert rlog.inclusion(index, size) == reference.inclusion_proof(index, size)
        assert rlog.consistency(first, n) == reference.consistency_proof(first, n)
        for receipt in rlog.receipts(0, n):
            check_log_receipt(receipt, gateway.public_bytes)
        witness = HeadWitness(gateway.public_bytes)
        for head in heads:
            span = witness.needs_proof(head)
            witness.observe(head, rlog.consistency(*span) if span else ())
        rlog.check(gateway.public_bytes)


def test_a_doctored_receipt_fails_naming_its_leaf(rlog: ReceiptLog, gateway: Identity) -> None:
    key = gateway.public_bytes
    rlog.append([entry(i) for i in range(9)])
    rlog.sign_head(gateway)
    good = rlog.receipt(6)
    richer = json.loads(good["entry"])
    richer["providers"][0]["paid_micro"] += 1000
    richer["amount_micro"] += 1000  # still adds up: only the log can tell
    doctored = [
        {**good, "entry": json.dumps(richer, sort_keys=True, separators=(",", ":"))},
        {**good, "index": 5},
        {**good, "proof": good["proof"][:-1]},
        {**good, "proof": [good["proof"][0][:-2] + "00", *good["proof"][1:]]},
        {**good, "head": {**good["head"], "size": 10}},
        {**good, "head": {**good["head"], "time": good["head"]["time"] + 1}},
    ]
    for receipt in doctored:
        with pytest.raises(ReceiptInvalid, match=rf"leaf {receipt['index']}:") as caught:
            check_log_receipt(receipt, key)
        assert caught.value.index == receipt["index"]
        assert not verify_log_receipt(receipt, key)
    with pytest.raises(ReceiptInvalid, match="not signed by gateway key"):
        check_log_receipt(good, Identity.generate().public_bytes)
    for garbage in (None, {}, "x", {**good, "extra": 1}, {**good, "index": True}):
        assert not verify_log_receipt(garbage, key)
    assert verify_log_receipt(good, key.hex())


def test_proofs_are_refused_past_the_committed_log(rlog: ReceiptLog, gateway: Identity) -> None:
    rlog.append([entry(0), entry(1)])
    with pytest.raises(merkle.MerkleError, match="not within the log's 0..2 leaves"):
        rlog.inclusion(0, 3)
    with pytest.raises(merkle.MerkleError, match="not within"):
        rlog.consistency(1, 5)
    with pytest.raises(Exception, match="not covered by a signed head"):
        rlog.receipt(0)
    with pytest.raises(EntryError, match="entries\\[1\\] must be"):
        rlog.append([entry(2), b""])
    assert rlog.size() == 2  # the whole batch was refused, not half of it


# -- the stored log under attack -----------------------------------------------------------------

def _edit(path: Path, sql: str, *args: object) -> None:
    """An outsider editing the SQLite file under the gateway."""
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, args)
    db.close()


def test_an_edited_row_fails_verification_naming_the_leaf(tmp_path: Path,
                                                          gateway: Identity) -> None:
    path, key = tmp_path / "gateway.db", gateway.public_bytes
    with ReceiptLog(path) as rlog:
        rlog.append([entry(i) for i in range(20)])
        rlog.sign_head(gateway)
    _edit(path, "UPDATE log_leaves SET entry = ? WHERE idx = 7", entry(7, paid=5000))
    with ReceiptLog(path) as rlog:
        with pytest.raises(ReceiptInvalid, match="leaf 7:.*inclusion proof for leaf 7"):
            check_log_receipt(rlog.receipt(7), key)
        check_log_receipt(rlog.receipt(8), key)  # the others still verify
        with pytest.raises(LogCorrupted, match="leaf 7: its entry does not match"):
            rlog.check(key)
        # A thorough forger rewrites every node to match the edited leaf: the tree is then
        # self-consistent, but it is a fork of what was signed, and the gateway refuses to sign.
        rlog.append([entry(20), entry(21)])
        forged = merkle.MerkleTree([entry(i, paid=5000) if i == 7 else entry(i)
                                    for i in range(22)])
        for level in range(6):
            for idx in range(22 >> level):
                _edit(path, "UPDATE log_nodes SET hash = ? WHERE level = ? AND idx = ?",
                      forged.node(level, idx), level, idx)
        assert rlog.root() == forged.root()
        with pytest.raises(LogCorrupted, match=r"refusing to sign.*head \(size 20"):
            rlog.sign_head(gateway)
        with pytest.raises(LogCorrupted, match=r"signed head \(size 20.*does not match"):
            rlog.check(key)


def test_a_deleted_leaf_is_named(tmp_path: Path, gateway: Identity) -> None:
    path = tmp_path / "gateway.db"
    with ReceiptLog(path) as rlog:
        rlog.append([entry(i) for i in range(10)])
        rlog.sign_head(gateway)
    _edit(path, "DELETE FROM log_leaves WHERE idx = 4")
    with ReceiptLog(path) as rlog:
        with pytest.raises(LogCorrupted, match="leaf 4 is missing"):
            rlog.check(gateway.public_bytes)
        with pytest.raises(LogCorrupted, match="leaf 4 is missing"):
            rlog.entries(0, 10)
        with pytest.raises(LogCorrupted, match="leaf 4 is missing"):
            rlog.receipt(4)


def _child(home: Path, db: Path, body: str) -> subprocess.Popen:
    """A writer in its own process, holding the same gateway key as the test."""
    script = textwrap.dedent("""
        import json, os, sqlite3, sys
        from gateway.identity import Identity
        from gateway.receipt_log import ReceiptLog, settlement_entry
        gateway = Identity.load_or_create(sys.argv[1])
        rlog = ReceiptLog(sys.argv[2])
    """) + getsource(entry) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script, str(home), str(db)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def test_committed_leaves_survive_os_exit_and_uncommitted_ones_vanish(
        tmp_path: Path) -> None:
    home, path = tmp_path / "home", tmp_path / "gateway.db"
    gateway = Identity.load_or_create(home)
    child = _child(home, path, """
        rlog.append([entry(i) for i in range(10)])
        print(json.dumps(rlog.sign_head(gateway).to_json()), flush=True)
        rlog.append([entry(i) for i in range(10, 15)])  # committed, not yet signed
        raw = sqlite3.connect(sys.argv[2], isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO log_leaves VALUES (15, x'7b7d')")  # never committed
        os._exit(0)  # no close, no COMMIT, no atexit
    """)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    signed = TreeHead.from_json(json.loads(out))
    with ReceiptLog(path) as rlog:
        assert rlog.size() == 15 and rlog.head() == signed
        assert rlog.entries(0, 100) == [entry(i) for i in range(15)]
        rlog.check(gateway.public_bytes)
        new = rlog.sign_head(gateway)
        check_head_consistency(signed, new, rlog.consistency(10, 15), gateway.public_bytes)


def test_a_sigkill_mid_append_loses_no_committed_batch(tmp_path: Path) -> None:
    home, path = tmp_path / "home", tmp_path / "gateway.db"
    gateway = Identity.load_or_create(home)
    child = _child(home, path, """
        n = 0
        while True:
            rlog.append([entry(n + i) for i in range(50)])
            n += 50
            print(json.dumps(rlog.sign_head(gateway).to_json()), flush=True)
    """)
    heads: list[TreeHead] = []
    try:
        def enough() -> bool:
            heads.append(TreeHead.from_json(json.loads(child.stdout.readline())))
            return len(heads) >= 8
        wait_for(enough, timeout=60, message="the writer to sign 8 batches", interval=0)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with ReceiptLog(path) as rlog:
        size = rlog.size()
        assert size % 50 == 0 and size >= heads[-1].size  # whole batches only, none lost
        rlog.check(gateway.public_bytes)
        latest = rlog.sign_head(gateway)
        for head in heads:  # every head a client saw before the kill is a prefix of the log now
            check_head_consistency(head, latest, rlog.consistency(head.size, latest.size),
                                   gateway.public_bytes)


# -- HTTP answers ---------------------------------------------------------------------------------

def test_http_answers_serve_the_log_to_anyone(rlog: ReceiptLog, gateway: Identity) -> None:
    assert log_http(rlog, "/log/head") == (
        404, {"error": "this gateway has signed no tree head yet: no task has settled"})
    assert log_http(rlog, "/health") is None
    rlog.append([entry(i) for i in range(MAX_ENTRIES_PER_READ + 5)])
    signed = rlog.sign_head(gateway)
    status, body = log_http(rlog, "/log/head")
    head = TreeHead.from_json(json.loads(json.dumps(body)))
    assert status == 200 and head == signed

    status, body = log_http(rlog, f"/log/inclusion?index=17&size={head.size}")
    assert status == 200 and body["index"] == 17
    merkle.verify_inclusion(merkle.hash_leaf(entry(17)), 17, head.size,
                            [bytes.fromhex(p) for p in body["proof"]], head.root)
    status, body = log_http(rlog, f"/log/consistency?first=3&second={head.size}")
    merkle.verify_consistency(3, head.size, rlog.root(3), head.root,
                              [bytes.fromhex(p) for p in body["proof"]])

    status, body = log_http(rlog, "/log/entries?start=2&end=4")
    assert (status, body) == (200, {"start": 2, "end": 4, "entries": [entry(2).decode(),
                                                                      entry(3).decode()]})
    status, body = log_http(rlog, f"/log/entries?start=3&end={head.size + 50}")
    assert status == 200 and body["end"] == 3 + MAX_ENTRIES_PER_READ  # one page, then page on
    status, body = log_http(rlog, f"/log/entries?start={head.size}&end={head.size + 9}")
    assert (status, body["entries"]) == (200, [])

    for bad in ("/log/inclusion?index=1", "/log/inclusion?index=-1&size=3",
                "/log/inclusion?index=x&size=3", "/log/consistency?first=9&second=3",
                f"/log/inclusion?index=0&size={head.size + 1}", "/log/entries?start=5&end=2"):
        status, body = log_http(rlog, bad)
        assert status == 400 and body["error"], bad
