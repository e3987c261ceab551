"""Transfers: one account pays another, as a settlement with a receipt-log leaf.

A transfer is booked exactly like a task's final settlement, so every tool that checks money
checks it too (``Ledger.check``, ``decompute-audit`` with or without ``--ledger``): the payer's
tokens are held in an escrow of their own (``transfer/<random>``), settled in full to the payee
with no gateway fee, and a leaf records it. The leaf is a plain settlement entry: ``client`` is
the payer, its one provider the payee with ``paid_micro`` the amount, ``function_hash`` is
``"transfer"``, and ``input_hash`` the SHA-256 of the memo (the memo itself stays with the
payer). The reply (the receipt) goes out once the accounting worker committed the leaf.

Every field is hostile input: the amount is a positive int of micro-tokens within the ledger's
range and within the payer's balance, the payee a known user account other than the payer, the
memo a short str. Only a client session may pay (a provider connection asks nothing of the kind).

Must never: move money before every check passed, or answer before the leaf is on disk.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Mapping

from gateway import protocol as p
from gateway.billing import Billing
from gateway.delivery import Delivery
from gateway.escrow import InsufficientFunds
from gateway.journal import Leaf
from gateway.ledger import MAX_MICRO, to_tokens
from gateway.receipt_log import settlement_entry

log = logging.getLogger(__name__)

#: Characters of a memo: a note for the payer's records, not a data channel into every leaf
#: (only its hash is logged, but it is checked and hashed on the event loop).
MAX_MEMO = 256
#: The prefix of a transfer's escrow id: never a client session's (those are 16 hex digits).
PREFIX = "transfer/"
FUNCTION = "transfer"


class TransferRefused(ValueError):
    """Why a transfer was refused; ``code`` is the protocol's error code for it."""

    def __init__(self, message: str, code: p.ErrorCode = p.ErrorCode.SCHEMA) -> None:
        super().__init__(message)
        self.code = code


def is_account(value: object) -> bool:
    """An account id as the gateway names them: a 32-byte Ed25519 key as lowercase hex."""
    return (isinstance(value, str) and len(value) == 64
            and not value.strip("0123456789abcdef"))


def parse(args: Mapping, payer: str) -> tuple[str, int, str]:
    """``(payee, micro, memo)`` from a transfer query's args, or :class:`TransferRefused`."""
    if not isinstance(args, Mapping) or set(args) - {"to", "micro", "memo"}:
        raise TransferRefused("transfer takes exactly {to, micro, memo}")
    payee, micro, memo = args.get("to"), args.get("micro"), args.get("memo", "")
    if not is_account(payee):
        raise TransferRefused(f"transfer: {str(payee)[:80]!r} is not an account (64 lowercase"
                              " hex digits, as Client.account and providers() show)")
    if payee == payer:
        raise TransferRefused("transfer: an account cannot pay itself")
    if isinstance(micro, bool) or not isinstance(micro, int) or not 1 <= micro <= MAX_MICRO:
        raise TransferRefused(f"transfer: the amount must be a positive whole number of"
                              f" micro-tokens up to 2**53, not {str(micro)[:40]}")
    if not isinstance(memo, str) or len(memo) > MAX_MEMO:
        raise TransferRefused(f"transfer: the memo must be a str of at most {MAX_MEMO}"
                              " characters")
    return payee, micro, memo


class Transfers:
    """Transfers waiting for their leaf, and the rules that admit them."""

    def __init__(self, billing: Billing, delivery: Delivery) -> None:
        self.billing = billing
        self.delivery = delivery
        #: Leaf token -> (session id, query id, escrow id) of a transfer not yet on disk.
        self._waiting: dict[int, tuple[str, int, str]] = {}

    def request(self, account: str, session_id: str, q: p.Query) -> p.Reply | None:
        """Book a transfer; None when it is booked (the reply follows its commit), else the
        refusal."""
        try:
            self._book(account, session_id, q)
        except TransferRefused as exc:
            log.info("transfer refused for %s: %s", account[:16], exc)
            return p.Reply(id=q.id, error=str(exc), code=exc.code.value)
        return None

    def _book(self, account: str, session_id: str, q: p.Query) -> None:
        session = self.delivery.sessions.get(session_id)
        if session is None or session.account != account:
            raise TransferRefused("transfer: only a client session may pay", p.ErrorCode.AUTH)
        payee, micro, memo = parse(q.args, account)
        accounts = self.billing.accounts
        if not accounts.loaded(payee):  # the shell loads a payee the ledger knows
            raise TransferRefused(f"transfer: account {payee[:16]}… is unknown to this gateway"
                                  " (it never connected); check the id", p.ErrorCode.NOT_FOUND)
        escrow = PREFIX + secrets.token_hex(12)
        refused = accounts.hold(escrow, account, micro)
        if isinstance(refused, InsufficientFunds):
            raise TransferRefused(
                f"transfer: insufficient funds: {to_tokens(refused.balance_micro):g} tokens"
                f" available, {to_tokens(micro):g} asked", p.ErrorCode.FUNDS)
        if refused is not None:
            raise TransferRefused(f"transfer: {refused}", p.ErrorCode.INTERNAL)
        settled = accounts.settle(escrow, payee, micro, True, fee_ppm=0)
        if isinstance(settled, Exception):  # cannot happen to a fresh hold; never half-booked
            accounts.close(escrow)
            raise TransferRefused(f"transfer: {settled}", p.ErrorCode.INTERNAL)
        memo_hash = hashlib.sha256(memo.encode()).hexdigest()
        entry = settlement_entry(
            task_id=escrow, client=account, function_hash=FUNCTION, input_hash=memo_hash,
            providers=[{"account": payee, "result_hash": memo_hash, "usage": {}, "prices": {},
                        "paid_micro": micro}],
            outcome=FUNCTION, amount_micro=micro, fee_micro=0,
            time_ms=int(time.time() * 1000))
        token = self.billing.next_token()
        accounts.log(Leaf(token, entry, (escrow,)))
        self._waiting[token] = (session_id, q.id, escrow)
        log.info("transfer %s: %s pays %s %d micro-tokens", escrow, account[:16], payee[:16],
                 micro)

    def committed(self, receipts: Mapping[int, dict | None], failed: Mapping[str, str]) -> None:
        """A group commit came back: each waiting transfer gets its receipt, or the ledger's
        refusal (its money was put back by the core's failure boundary)."""
        for token in list(self._waiting):
            session_id, qid, escrow = self._waiting[token]
            if escrow in failed:
                reply = p.Reply(id=qid, error=f"transfer failed in the ledger: {failed[escrow]}",
                                code=p.ErrorCode.INTERNAL.value)
            elif token in receipts:
                reply = p.Reply(id=qid, data={"receipt": receipts[token], "escrow": escrow})
            else:
                continue
            del self._waiting[token]
            session = self.delivery.sessions.get(session_id)
            if session is not None:
                session.send(p.encode(reply))
