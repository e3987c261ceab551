"""The public receipt log end to end (issue 11, acceptance 3 and 4): real gateways, real priced
providers, the real SQLite file, ``decompute-audit`` as a process.

- every receipt of a 1,000-task priced ``map`` verifies offline, and the audit passes on them
  (against the gateway, and offline against an exported log);
- a settled leaf changed in the SQLite file, or deleted, fails the audit naming the leaf;
- a gateway that forks its log (restarted on a rolled-back database, same key) is caught by the
  audit (naming both heads) and by a client that saw the old head;
- a gateway SIGKILLed mid-map and restarted on the same database: every receipt issued before the
  kill still verifies and is consistent with the new heads, and the money still adds up.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import REPO, Gateway, descendants, kill_tree, start_gateway
from helpers import http_get, spawn, wait_for

from gateway.identity import Identity
from gateway.ledger import Ledger
from gateway.receipt_log import (
    ForkDetected,
    ReceiptLog,
    TreeHead,
    check_log_receipt,
    log_http,
    money_in,
    settlement_entry,
)
from notebook_ext import Client, verify_receipt
from notebook_ext.receipt_book import ReceiptBook

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks are defined here

PRICE_CPU = 0.01
PRICED = ("--local-price-cpu", str(PRICE_CPU), "--fee-percent", "10")


def square(x: int) -> int:
    return x * x


def nap(x: int) -> int:
    import time
    time.sleep(0.02)
    return x


def audit(*args: str | Path) -> subprocess.CompletedProcess:
    """``decompute-audit`` as a process (the console script's module)."""
    return subprocess.run([sys.executable, "-m", "gateway.audit", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def db_of(gw: Gateway) -> Path:
    return gw.home.parent / "ledger.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    return db


def leaves_agree_with_ledger(path: Path) -> int:
    """Every leaf's money is its escrow's final settlement in the ledger, and the ledger is
    conserved; returns how many leaves."""
    with contextlib.closing(connect(path)) as db:
        entries = [bytes(e) for (e,) in db.execute("SELECT entry FROM log_leaves ORDER BY idx")]
        escrows = {t: (c, f, s) for t, c, f, s in
                   db.execute("SELECT task_id, charged, fee, state FROM escrows")}
    for entry in entries:
        settled = json.loads(entry)
        assert escrows[settled["task_id"]] == (settled["amount_micro"], settled["fee_micro"],
                                               "settled"), settled
    with Ledger(path) as led:
        assert led.totals().conserved
        led.check()
    return len(entries)


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gateway with two priced local providers and a client that ran a 1,000-task map."""
    tmp = tmp_path_factory.mktemp("audit")
    gw = start_gateway(tmp, local_providers=2, extra=PRICED)
    client = Client(gw.url, home=tmp / "client", stream_output=False)
    try:
        futs = client.map(square, range(1000), budget=0.05, chunksize=1)
        assert client.gather(futs) == [x * x for x in range(1000)]
        yield gw, client, futs, tmp
    finally:
        client.close()
        gw.stop()


def test_every_receipt_of_a_priced_map_verifies_and_the_audit_passes(priced: Any) -> None:
    gw, client, futs, tmp = priced
    key = client.gateway_key
    receipts = [f.receipt for f in futs]
    assert all(r is not None and verify_receipt(r, key) for r in receipts)
    settled = [check_log_receipt(r, key) for r in receipts]
    assert {s["client"] for s in settled} == {client.account}
    assert sum(s["amount_micro"] for s in settled) > 0
    assert len({r["index"] for r in receipts}) == 1000
    heads = {(r["head"]["size"], r["head"]["root"]) for r in receipts}
    print(f"\n1,000 receipts under {len(heads)} signed tree heads")
    assert len(heads) < 1000, "a tree head per batch, not per task"
    held = client.receipts()
    assert len(held) == 1000 and [r["index"] for r in held] == sorted(r["index"] for r in held)
    path = tmp / "receipts.jsonl"
    assert client.save_receipts(path) == 1000

    run = audit(path, "--gateway", gw.url, "--save-head", tmp / "head.json")
    assert run.returncode == 0, run.stderr
    assert "ok: 1000 receipts" in run.stdout and client.account in run.stdout
    saved = TreeHead.from_json(json.loads((tmp / "head.json").read_text()))
    assert saved.size >= 1000

    assert audit("export", "--db", db_of(gw), "-o", tmp / "log.jsonl").returncode == 0
    run = audit(path, "--gateway-key", key, "--log", tmp / "log.jsonl",
                "--head", tmp / "head.json")
    assert run.returncode == 0, run.stderr
    money = money_in(json.loads(line)["entry"] for line in
                     (tmp / "log.jsonl").read_text().splitlines() if '"entry"' in line)
    assert sum(money["spent"].values()) == sum(money["earned"].values()) + money["fees_micro"]
    assert leaves_agree_with_ledger(db_of(gw)) == 1000


def test_a_changed_or_deleted_leaf_fails_the_audit_naming_it(priced: Any) -> None:
    gw, client, futs, tmp = priced
    path = tmp / "receipts-tamper.jsonl"
    client.save_receipts(path)
    victim = futs[500].receipt["index"]
    with contextlib.closing(connect(db_of(gw))) as db:
        (original,) = db.execute("SELECT entry FROM log_leaves WHERE idx = ?",
                                 (victim,)).fetchone()
        forged = json.loads(original)
        forged["amount_micro"] += 7  # still adds up on its own: the fee took it
        forged["fee_micro"] += 7
        text = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
        db.execute("UPDATE log_leaves SET entry = ? WHERE idx = ?", (text, victim))
        try:
            run = audit(path, "--gateway", gw.url)
            assert run.returncode == 1
            assert f"leaf {victim}: the log's entry differs" in run.stderr, run.stderr
            assert "does not match the log's first" in run.stderr  # and no head covers it
        finally:
            db.execute("UPDATE log_leaves SET entry = ? WHERE idx = ?", (original, victim))

        db.execute("DELETE FROM log_leaves WHERE idx = ?", (victim,))
        try:
            run = audit(path, "--gateway", gw.url)
            assert run.returncode == 1 and f"leaf {victim} is missing" in run.stderr, run.stderr
            assert audit("export", "--db", db_of(gw), "-o", tmp / "cut.jsonl").returncode != 0
        finally:
            db.execute("INSERT INTO log_leaves (idx, entry) VALUES (?, ?)", (victim, original))
    assert audit(path, "--gateway", gw.url).returncode == 0  # put back: it all holds again


def test_a_settled_row_changed_in_the_ledger_fails_the_operators_audit_naming_the_leaf(
        priced: Any) -> None:
    gw, client, futs, tmp = priced
    path = tmp / "receipts-ledger.jsonl"
    client.save_receipts(path)
    assert audit(path, "--gateway", gw.url, "--ledger", db_of(gw)).returncode == 0
    victim = futs[700].receipt
    task = json.loads(victim["entry"])["task_id"]
    with contextlib.closing(connect(db_of(gw))) as db:
        db.execute("UPDATE escrows SET charged = charged + 5 WHERE task_id = ?", (task,))
        try:
            run = audit(path, "--gateway", gw.url, "--ledger", db_of(gw))
            assert run.returncode == 1
            assert f"leaf {victim['index']}: task {task} settled" in run.stderr, run.stderr
            assert audit(path, "--gateway", gw.url).returncode == 0  # the log alone is intact
        finally:
            db.execute("UPDATE escrows SET charged = charged - 5 WHERE task_id = ?", (task,))
        db.execute("UPDATE log_leaves SET entry = entry || ' ' WHERE idx = ?", (victim["index"],))
        try:  # the stored log against its own nodes: names the leaf too
            run = audit(path, "--gateway", gw.url, "--ledger", db_of(gw))
            assert f"leaf {victim['index']}: its entry does not match" in run.stderr, run.stderr
        finally:
            db.execute("UPDATE log_leaves SET entry = rtrim(entry, ' ') WHERE idx = ?",
                       (victim["index"],))
    assert audit(path, "--gateway", gw.url, "--ledger", db_of(gw)).returncode == 0


def restart_on(port: int, tmp: Path) -> Gateway:
    """The gateway of ``tmp`` (its key, its database) again on ``port``, one priced provider."""
    log = tmp / "gateway-again.log"
    cmd = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
           "--db", str(tmp / "ledger.sqlite"), "--faucet", "1000", "--local-providers", "1",
           *PRICED]
    gw = Gateway(spawn(cmd, tmp / "gateway-home", log, REPO), port, tmp / "gateway-home", log)
    try:
        gw.wait_providers(1)
    except BaseException:
        gw.stop()
        raise
    return gw


def test_a_forked_log_is_caught_by_the_audit_and_by_a_connected_client(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, local_providers=1, extra=PRICED)
    client = Client(gw.url, home=tmp_path / "client", stream_output=False)
    try:
        client.gather(client.map(square, range(3), budget=0.05, chunksize=1))
        snapshot = tmp_path / "rolled-back.sqlite"
        with contextlib.closing(connect(db_of(gw))) as db, \
                contextlib.closing(sqlite3.connect(snapshot)) as copy:
            db.backup(copy)  # the history the gateway will pretend it always had
        client.gather(client.map(square, range(3, 6), budget=0.05, chunksize=1))
        client.check_log()  # the newest head this client has seen: 6 leaves
        assert client.save_receipts(tmp_path / "receipts.jsonl") == 6
        assert audit(tmp_path / "receipts.jsonl", "--gateway", gw.url, "--save-head",
                     tmp_path / "head.json").returncode == 0
        gw.stop()
        for suffix in ("", "-wal", "-shm"):
            db_of(gw).with_name(db_of(gw).name + suffix).unlink(missing_ok=True)
        snapshot.rename(db_of(gw))

        gw = restart_on(gw.port, tmp_path)  # same address, same key, a forked log
        other = Client(gw.url, home=tmp_path / "other", stream_output=False)
        with other:
            other.gather(other.map(square, range(100, 104), budget=0.05,
                                   chunksize=1))  # leaves 3..6, forked
        run = audit(tmp_path / "receipts.jsonl", "--gateway", gw.url,
                    "--head", tmp_path / "head.json")
        assert run.returncode == 1
        assert "saved head (size 6" in run.stderr and "head (size 7" in run.stderr, run.stderr

        # the client that saw the head of 6 leaves is still open, and reconnects to the fork
        with pytest.raises(ForkDetected, match=r"head \(size 7.*does not extend head \(size 6"):
            client.check_log()
        wait_for(lambda: client.status == "connected", 30, message="the client reconnected")
        fut = client.submit(square, 7, budget=0.05)
        assert fut.result(30) == 49 and verify_receipt(fut.receipt, client.gateway_key)
        with pytest.raises(ForkDetected, match="size 6"):  # its receipt's head: still a fork
            client.receipts()
    finally:
        client.close()
        gw.stop()


def test_receipts_from_before_a_sigkill_verify_against_the_restarted_gateways_heads(
        tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, local_providers=2, extra=PRICED)
    client = Client(gw.url, home=tmp_path / "client", stream_output=False)
    try:
        futs = client.map(nap, range(400), budget=0.05, chunksize=1)
        wait_for(lambda: sum(f.receipt is not None for f in futs) >= 60, 60,
                 message="60 receipts before the kill")
        procs = descendants(gw.proc.pid)
        gw.proc.send_signal(signal.SIGKILL)  # mid-map: settlements in flight
        gw.proc.wait(10)
        kill_tree(procs)
        before = [f.receipt for f in futs if f.receipt is not None]
    finally:
        client.close(timeout=2)
    key = client.gateway_key
    (tmp_path / "before.jsonl").write_text(
        "".join(json.dumps(dict(r)) + "\n" for r in before))
    newest = max((r["head"] for r in before), key=lambda h: h["size"])
    (tmp_path / "head.json").write_text(json.dumps(newest))

    gw = start_gateway(tmp_path, local_providers=2, extra=PRICED)  # same database, same key
    try:
        with Client(gw.url, home=tmp_path / "again", stream_output=False) as again:
            after = again.gather(again.map(square, range(5), budget=0.05, chunksize=1))
            assert after == [0, 1, 4, 9, 16]
            again._receipt_book.observe(newest)  # the old head, then the new ones: consistent
            again.check_log()
            assert len(again.receipts()) == 5
        assert all(verify_receipt(r, key) for r in before)
        run = audit(tmp_path / "before.jsonl", "--gateway", gw.url,
                    "--head", tmp_path / "head.json")
        assert run.returncode == 0, run.stderr
        assert leaves_agree_with_ledger(db_of(gw)) >= len(before) + 5
    finally:
        gw.stop()


def test_the_log_is_served_over_http_to_anyone(priced: Any) -> None:
    gw, client, futs, _ = priced
    receipt = futs[10].receipt
    size, index = receipt["head"]["size"], receipt["index"]
    status, body = http_get(gw.port, f"/log/inclusion?index={index}&size={size}")
    assert status == 200 and json.loads(body)["proof"] == receipt["proof"]
    status, body = http_get(gw.port, "/log/head")
    assert status == 200 and json.loads(body)["size"] >= 1000
    status, body = http_get(gw.port, f"/log/entries?start={index}&end={index + 1}")
    assert status == 200 and json.loads(body)["entries"] == [receipt["entry"]]
    status, body = http_get(gw.port, f"/log/consistency?first={size}&second=1000")
    assert status == 200 and isinstance(json.loads(body)["proof"], list)
    status, body = http_get(gw.port, "/log/inclusion?index=-1&size=x")
    assert status == 400 and "index must be an integer" in json.loads(body)["error"]
    status, body = http_get(gw.port, "/log/entries?start=5000&end=5001")
    assert status == 400 and "not within the log" in json.loads(body)["error"]


class LogServer:
    """A gateway's ``/log/...`` over real HTTP for one :class:`ReceiptLog` (the honest branch)."""

    def __init__(self, rl: ReceiptLog) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
                status, body = log_http(rl, self.path) or (404, {"error": "no such path"})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"ws://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def entry(i: int, branch: str = "main") -> bytes:
    return settlement_entry(task_id=f"{branch}-{i}", client="c" * 64, function_hash="f",
                            input_hash="i", outcome="r", amount_micro=3, fee_micro=1, time_ms=i,
                            providers=[{"account": "p" * 64, "result_hash": "r", "usage": {},
                                        "prices": {}, "paid_micro": 2}])


def test_a_fork_in_a_head_the_background_passed_over_is_caught_when_receipts_are_taken(
        tmp_path: Path) -> None:
    gateway = Identity.generate()
    honest, forked = ReceiptLog(tmp_path / "honest.sqlite"), ReceiptLog(tmp_path / "fork.sqlite")
    server = LogServer(honest)
    try:
        receipts = []
        for rl, branch, n in ((honest, "main", 2), (forked, "main", 2), (forked, "fork", 1),
                              (honest, "main", 2)):
            first = rl.append([entry(rl.size() + i, branch) for i in range(n)])
            head = rl.sign_head(gateway)
            if rl is honest or branch == "fork":
                receipts.append(rl.receipt(first, head))
        # heads met: honest size 2, forked size 3, honest size 4 (all signed by the gateway)
        assert [r["head"]["size"] for r in receipts] == [2, 3, 4]
        book = ReceiptBook(gateway.account, server.url)
        try:
            for receipt in receipts:  # all at once: the background checks the newest only
                assert verify_receipt(receipt, gateway.account)  # each is fine on its own
                book.add(receipt)
            with pytest.raises(ForkDetected, match=r"head \(size 4.*head \(size 3|"
                                                   r"head \(size 3.*head \(size 4"):
                book.check()
            assert isinstance(book.error, ForkDetected)
        finally:
            book.close()
    finally:
        server.close()
        honest.close()
        forked.close()
