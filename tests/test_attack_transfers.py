"""Issue 14, acceptance 5: ``client.transfer`` moves exactly the amount, as a leaf of the receipt
log, and conservation holds; hostile transfer requests move nothing.

The attacks are :class:`fakes.FakeClient` connections that send ``transfer`` queries the real
client would never send (negative, zero, float, huge amounts; malformed, unknown or own payee;
oversized memos; more than the balance). The gateway runs with a fee, to show that a transfer
carries none. After every test conftest's ``attack_books`` audits the ledger.
"""

from __future__ import annotations

import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Gateway, start_gateway
from fakes import FakeClient, FakeProvider

from gateway import protocol as p
from gateway.ledger import Ledger, to_micro
from gateway.receipt_log import decode_entry
from notebook_ext import Client, GatewayRefused, InsufficientFunds, verify_receipt

FAUCET = 1000.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("transfers"),
                            extra=("--fee-percent", "10"))
    yield gateway
    gateway.stop()


def db_of(gw: Gateway) -> Path:
    return gw.home.parent / "ledger.sqlite"


def ask(fake: FakeClient, qid: int, args: Any, timeout: float = 20.0) -> p.Reply:
    """Send one transfer query as is; the gateway's reply to it."""
    fake.send(p.Query(id=qid, what="transfer", args=args))
    while True:
        try:
            msg = fake.other.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply to transfer query {qid}") from None
        if isinstance(msg, p.Reply) and msg.id == qid:
            return msg


def balances(gw: Gateway, *accounts: str) -> list[int]:
    with Ledger(db_of(gw)) as led:
        return [led.balance(a) for a in accounts]


def test_hostile_transfers_are_refused_and_move_nothing(gw: Gateway, tmp_path: Path) -> None:
    with FakeClient(gw.url, tmp_path / "payer") as payer, \
            FakeClient(gw.url, tmp_path / "payee") as payee:


        before = balances(gw, payer.account, payee.account)
        to = payee.account
        hostile: list[tuple[Any, str]] = [
            ({"to": to, "micro": -5}, "positive whole number"),
            ({"to": to, "micro": 0}, "positive whole number"),
            ({"to": to, "micro": 1.5}, "positive whole number"),
            ({"to": to, "micro": True}, "positive whole number"),
            ({"to": to, "micro": 2**53 + 1}, "positive whole number"),
            ({"to": to, "micro": "100"}, "positive whole number"),
            ({"to": to, "micro": to_micro(FAUCET) + 1}, "insufficient funds"),
            ({"to": "not-an-account", "micro": 5}, "is not an account"),
            ({"to": to.upper(), "micro": 5}, "is not an account"),
            ({"to": ["x"], "micro": 5}, "is not an account"),
            ({"to": "ab" * 32, "micro": 5}, "unknown to this gateway"),
            ({"to": payer.account, "micro": 5}, "cannot pay itself"),
            ({"to": to, "micro": 5, "memo": "x" * 257}, "memo"),
            ({"to": to, "micro": 5, "memo": 7}, "memo"),
            ({"to": to, "micro": 5, "extra": 1}, "exactly"),
            ({}, "is not an account"),
        ]
        for i, (args, why) in enumerate(hostile, 1):
            reply = ask(payer, i, args)
            assert reply.error and why in reply.error, (args, reply)
            assert reply.data is None
        assert balances(gw, payer.account, payee.account) == before


def test_a_provider_connection_cannot_pay(gw: Gateway, tmp_path: Path) -> None:
    with FakeClient(gw.url, tmp_path / "payee") as payee, \
            FakeProvider(gw.url, tmp_path / "prov") as prov:


        before = balances(gw, prov.account, payee.account)
        prov.send(p.Query(id=1, what="transfer", args={"to": payee.account, "micro": 5}))
        reply = prov.other.get(timeout=20)
        while not isinstance(reply, p.Reply):
            reply = prov.other.get(timeout=20)
        assert reply.error and "only a client session" in reply.error
        assert balances(gw, prov.account, payee.account) == before


def test_transfer_moves_exactly_the_amount_as_a_verified_leaf(gw: Gateway,
                                                                tmp_path: Path) -> None:
    with Client(gw.url, home=tmp_path / "a", stream_output=False) as a, \
            Client(gw.url, home=tmp_path / "b", stream_output=False) as b:
        a0, b0 = float(a.balance()), float(b.balance())
        receipt = a.transfer(b.account, 12.345678, memo="thanks for the gradients")
        assert verify_receipt(receipt, a.gateway_key)
        entry = decode_entry(receipt["entry"])
        assert entry["client"] == a.account and entry["fee_micro"] == 0
        assert entry["amount_micro"] == 12_345_678
        assert entry["providers"][0]["account"] == b.account
        assert entry["providers"][0]["paid_micro"] == 12_345_678
        assert entry["function_hash"] == "transfer"
        assert float(a.balance()) == pytest.approx(a0 - 12.345678, abs=1e-9)
        assert float(b.balance()) == pytest.approx(b0 + 12.345678, abs=1e-9)
        assert balances(gw, a.account, b.account) == [to_micro(a0) - 12_345_678,
                                                      to_micro(b0) + 12_345_678]
        b.transfer(a, 0.000001)  # anything with .account; one micro-token is the least
        assert receipt in a.receipts()
        path = tmp_path / "receipts.jsonl"
        assert a.save_receipts(path) == 1
        done = subprocess.run([sys.executable, "-m", "gateway.audit", str(path), "--gateway",
                               gw.url, "--ledger", str(db_of(gw))],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr
        with Ledger(db_of(gw)) as led:
            led.check()
            assert led.totals().conserved


def test_the_client_refuses_malformed_transfers_before_sending(gw: Gateway,
                                                                tmp_path: Path) -> None:
    with Client(gw.url, home=tmp_path / "a", stream_output=False) as a:
        other = "cd" * 32
        for tokens in (-1, 0, float("nan"), float("inf"), 1e-9):
            with pytest.raises(ValueError):
                a.transfer(other, tokens)
        with pytest.raises(TypeError):
            a.transfer(other, "5")
        with pytest.raises(ValueError, match="not an account"):
            a.transfer("alice", 1)
        with pytest.raises(ValueError, match="itself"):
            a.transfer(a.account, 1)
        with pytest.raises(ValueError, match="memo"):
            a.transfer(other, 1, memo="m" * 300)
        with pytest.raises(GatewayRefused, match="unknown"):
            a.transfer(other, 1)
        with Client(gw.url, home=tmp_path / "b", stream_output=False) as b, \
                pytest.raises(InsufficientFunds):
            a.transfer(b.account, FAUCET * 10)
