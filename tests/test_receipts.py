"""Settlement receipts: an intact receipt verifies after any round trip; anything else is False."""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.accounting_worker import AccountingWorker
from gateway.billing import Billing, Settled, Share
from gateway.identity import Identity
from gateway.journal import Committed
from gateway.ledger import Ledger
from gateway.receipt_log import check_log_receipt
from gateway.receipts import (
    RECEIPT_CONTEXT,
    RECEIPT_FIELDS,
    make_receipt,
    signed_bytes,
    verify_receipt,
)
from notebook_ext.money import Receipt

GATEWAY = Identity.generate()


@pytest.fixture
def receipt() -> dict[str, Any]:
    return make_receipt(
        GATEWAY,
        task_id="task-42",
        client="c" * 64,
        provider="p" * 64,
        usage={"cpu_seconds": 1.25, "wall_seconds": 2.0, "max_rss_bytes": 10_485_760,
               "gpu_seconds": 0.0},
        prices={"cpu": 0.001, "memory": 0.0, "gpu": 0.05},
        amount_micro=1_250,
        fee_micro=31,
        result_hash="ab" * 32,
        settled_at=1_760_000_000.123456,
    )


def test_intact_receipt_verifies_with_hex_or_raw_key(receipt: dict[str, Any]) -> None:
    assert set(receipt) == RECEIPT_FIELDS
    assert receipt["gateway"] == GATEWAY.account
    assert verify_receipt(receipt, GATEWAY.account)
    assert verify_receipt(receipt, GATEWAY.account.upper())
    assert verify_receipt(receipt, GATEWAY.public_bytes)


def test_canonical_bytes_are_sorted_compact_json_after_a_context(receipt: dict[str, Any]) -> None:
    data = signed_bytes(receipt)
    assert data.startswith(RECEIPT_CONTEXT)
    body = json.loads(data[len(RECEIPT_CONTEXT):])
    assert "signature" not in body and body == {k: v for k, v in receipt.items()
                                                if k != "signature"}
    assert data[len(RECEIPT_CONTEXT):] == json.dumps(body, sort_keys=True,
                                                     separators=(",", ":")).encode()
    assert signed_bytes(dict(reversed(list(receipt.items())))) == data  # key order is irrelevant


def test_receipt_survives_msgpack_and_json_round_trips(receipt: dict[str, Any]) -> None:
    over_wire = msgpack.unpackb(msgpack.packb(receipt), raw=False)
    on_disk = json.loads(json.dumps(receipt))
    assert verify_receipt(over_wire, GATEWAY.account)
    assert verify_receipt(on_disk, GATEWAY.account)


def _tampered(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, float(value)]
    if isinstance(value, float):
        return [value + 1e-6, int(value)]
    if isinstance(value, str):
        return [value + "0", value[:-1] + ("0" if value[-1] != "0" else "1"), value.upper()]
    if isinstance(value, dict):
        first = next(iter(value))
        return [{**value, "extra": 1}, {k: v for k, v in value.items() if k != first},
                {**value, first: value[first] + 1}]
    raise AssertionError(value)


@pytest.mark.parametrize("field", sorted(RECEIPT_FIELDS))
def test_any_single_tampered_field_fails(receipt: dict[str, Any], field: str) -> None:
    changes = [c for c in _tampered(receipt[field]) if c != receipt[field]
               or type(c) is not type(receipt[field])]
    assert changes
    for change in changes:
        forged = copy.deepcopy(receipt)
        forged[field] = change
        assert verify_receipt(forged, GATEWAY.account) is False, (field, change)


def test_added_or_removed_field_fails(receipt: dict[str, Any]) -> None:
    assert verify_receipt({**receipt, "note": "x"}, GATEWAY.account) is False
    for field in RECEIPT_FIELDS:
        partial = {k: v for k, v in receipt.items() if k != field}
        assert verify_receipt(partial, GATEWAY.account) is False


def test_wrong_gateway_key_fails(receipt: dict[str, Any]) -> None:
    other = Identity.generate()
    assert verify_receipt(receipt, other.account) is False
    assert verify_receipt(receipt, other.public_bytes) is False
    # Re-signing with another key while claiming it in `gateway` does not fool a verifier
    # that trusts the real gateway key.
    forged = make_receipt(other, **{k: receipt[k] for k in (
        "task_id", "client", "provider", "usage", "prices", "amount_micro", "fee_micro",
        "result_hash", "settled_at")})
    assert verify_receipt(forged, other.account) is True
    assert verify_receipt(forged, GATEWAY.account) is False


@pytest.mark.parametrize("garbage", [
    None, {}, [], "receipt", b"receipt", 42, {"signature": "00"}, {"signature": None},
])
def test_garbage_receipts_are_false(garbage: Any) -> None:
    assert verify_receipt(garbage, GATEWAY.account) is False


@pytest.mark.parametrize("signature", [None, "", "zz" * 64, "00" * 64, "ab", 7, b"\x00" * 64])
def test_bad_signatures_are_false(receipt: dict[str, Any], signature: Any) -> None:
    assert verify_receipt({**receipt, "signature": signature}, GATEWAY.account) is False


@pytest.mark.parametrize("key", [None, "", "not hex", "ab" * 16, b"short", 12, [1, 2]])
def test_bad_keys_are_false(receipt: dict[str, Any], key: Any) -> None:
    assert verify_receipt(receipt, key) is False


@pytest.mark.parametrize("field,value", [
    ("usage", {"cpu_seconds": float("nan")}), ("usage", {"cpu_seconds": "1"}),
    ("usage", {1: 2.0}), ("usage", [1.0]), ("prices", None), ("amount_micro", True),
    ("amount_micro", -1), ("fee_micro", 10**9), ("settled_at", float("inf")), ("version", 2),
    ("task_id", ""), ("client", 5),
])
def test_malformed_fields_are_false_never_raise(receipt: dict[str, Any], field: str,
                                                value: Any) -> None:
    assert verify_receipt({**receipt, field: value}, GATEWAY.account) is False


def test_make_receipt_refuses_what_could_not_verify() -> None:
    fields: dict[str, Any] = dict(task_id="t", client="c", provider="p", usage={}, prices={},
                                  amount_micro=10, fee_micro=1, result_hash="h", settled_at=1.0)
    assert verify_receipt(make_receipt(GATEWAY, **fields), GATEWAY.account)
    for bad in ({"fee_micro": 11}, {"amount_micro": 1.5}, {"task_id": ""},
                {"usage": {"cpu_seconds": float("nan")}}, {"prices": {"cpu": "free"}}):
        with pytest.raises((TypeError, ValueError)):
            make_receipt(GATEWAY, **{**fields, **bad})


def test_numpy_numbers_become_plain_numbers() -> None:
    np = pytest.importorskip("numpy")
    receipt = make_receipt(GATEWAY, task_id="t", client="c", provider="p",
                           usage={"cpu_seconds": np.float64(0.5), "max_rss_bytes": np.int64(7)},
                           prices={"cpu": np.float32(0.25)}, amount_micro=1, fee_micro=0,
                           result_hash="h", settled_at=np.float64(2.0))
    assert type(receipt["usage"]["max_rss_bytes"]) is int
    assert type(receipt["usage"]["cpu_seconds"]) is float
    assert verify_receipt(msgpack.unpackb(msgpack.packb(receipt)), GATEWAY.account)


# ------------------------------------------------------------------ receipts of the log (billing)


def _settled(i: int, **changes: Any) -> Settled:
    fields: dict[str, Any] = dict(
        task_id=f"s/task-{i}", client="c" * 64, function_hash="f" * 64, input_hash="i" * 64,
        shares=(Share("p" * 64, "r" * 64, {"cpu_seconds": 0.25}, {"cpu": 0.5}, 113),),
        outcome="r" * 64, amount_micro=125, fee_micro=12)
    return Settled(**{**fields, **changes})


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[Billing]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    b = Billing(ledger, GATEWAY)
    yield b
    b.log.close()
    ledger.close()


@pytest.fixture
def receipts_of(billing: Billing) -> Iterator[Callable[[list[Settled]], list[dict | None]]]:
    """Log settlements as the gateway does: leaves queued by the core, committed and signed by
    the real accounting worker in one group; each one's receipt, or None."""
    answers: queue.Queue[Committed] = queue.Queue()
    worker = AccountingWorker(billing.ledger, billing.log, GATEWAY, answers.put)
    worker.start()

    def log(settled: list[Settled]) -> list[dict | None]:
        tokens = [billing.log_leaf(s, ()) for s in settled]
        worker.submit(*billing.accounts.take_journal())
        done = answers.get(timeout=30)
        return [None if t is None else done.receipts.get(t) for t in tokens]

    yield log
    worker.stop()


def test_a_batch_of_settlements_is_one_signed_head_and_each_receipt_verifies(
        billing: Billing, receipts_of: Callable) -> None:
    receipts = receipts_of([_settled(i) for i in range(5)])
    assert [r["index"] for r in receipts] == list(range(5))
    assert len({json.dumps(r["head"], sort_keys=True) for r in receipts}) == 1  # one signature
    assert len(billing.log.heads()) == 1
    for i, r in enumerate(receipts):
        assert verify_receipt(r, GATEWAY.account)  # the one verify_receipt, both formats
        assert verify_receipt(msgpack.unpackb(msgpack.packb(r)), GATEWAY.public_bytes)
        settled = check_log_receipt(r, GATEWAY.account)
        assert settled["task_id"] == f"s/task-{i}" and settled["amount_micro"] == 125
        assert settled["providers"][0]["paid_micro"] + settled["fee_micro"] == 125
        readable = Receipt(r)  # the client's view reads the leaf, and stays the signed dict
        assert (readable["amount_micro"], readable["provider"]) == (125, "p" * 64)
        assert dict(readable) == r and verify_receipt(readable, GATEWAY.account)
    assert not verify_receipt(receipts[0], Identity.generate().account)
    assert receipts_of([_settled(9)])[0]["head"]["size"] == 6  # the next batch extends it


def test_a_settlement_that_does_not_add_up_gets_no_receipt_and_spoils_no_other(
        receipts_of: Callable) -> None:
    receipts = receipts_of([_settled(0), _settled(1, fee_micro=13), _settled(2)])
    assert receipts[1] is None
    assert [r["index"] for r in (receipts[0], receipts[2])] == [0, 1]
    assert all(verify_receipt(r, GATEWAY.account) for r in (receipts[0], receipts[2]))


def test_a_log_edited_under_the_gateway_is_refused_and_results_still_go_out(
        billing: Billing, receipts_of: Callable, tmp_path: Path) -> None:
    receipts_of([_settled(i) for i in range(4)])
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.sqlite")) as db:
        db.execute("UPDATE log_nodes SET hash = ? WHERE level = 2 AND idx = 0", (b"\0" * 32,))
        db.commit()  # the attack: rewrite history under a running gateway
    assert receipts_of([_settled(4), _settled(5)]) == [None, None]  # never a forked head
    assert billing.log.head().size == 4


def test_a_hub_whose_log_refuses_to_sign_still_answers_every_result(tmp_path: Path) -> None:
    from test_hub_money import client, finish, gateway, provider, stop, submit  # as the shell

    hub, ledger = gateway(tmp_path / "ledger.sqlite", GATEWAY)
    try:
        conn, _ = provider(hub)
        session, peer = client(hub)
        for key in ("a", "b"):
            submit(hub, session, key, budget=1.0)
        a, b = sorted(hub.tasks.values(), key=lambda t: t.key)
        a.assigned_at -= 1.0
        finish(hub, conn, a.task_id, cpu=0.5)
        assert verify_receipt(peer.results()[0].receipt, GATEWAY.account)
        with contextlib.closing(sqlite3.connect(tmp_path / "ledger.sqlite")) as db:
            db.execute("UPDATE log_nodes SET hash = ? WHERE level = 0 AND idx = 0",
                       (b"\0" * 32,))
            db.commit()
        b.assigned_at -= 1.0
        finish(hub, conn, b.task_id, cpu=0.5)
        done = peer.results()[1]
        assert done.key == "b" and done.status == "finished" and done.receipt is None
        assert done.cost == 0.5 and ledger.open_escrows() == {}
        ledger.check(live=())
    finally:
        hub.billing.log.close()
        stop(hub, ledger)
