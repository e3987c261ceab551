"""Billing: metered usage -> prices -> ledger movements -> signed receipts.

The hub calls this; :mod:`gateway.ledger` records. Escrow is held at submit (``budget``, else
``max_price`` x cpus x ``timeout``, else the gateway's default escrow), providers' CUMULATIVE usage
is settled as it arrives (idempotent, so a repeated heartbeat moves nothing), and the final
settlement refunds the leftover and yields the receipt. A task whose charge reaches its escrow is
stopped: the client is never charged more than it reserved.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.identity import Identity
from gateway.ledger import Ledger, LedgerError, to_micro, to_tokens
from gateway.protocol import Result, TaskSpec
from gateway.receipts import make_receipt

log = logging.getLogger(__name__)


def price_micro(usage: dict[str, float], prices: dict[str, float]) -> int:
    """What ``usage`` costs at ``prices`` (tokens per CPU-second, GiB-second, GPU-second)."""
    tokens = (usage.get("cpu_seconds", 0.0) * prices.get("cpu", 0.0)
              + usage.get("memory_gib_seconds", 0.0) * prices.get("memory", 0.0)
              + usage.get("gpu_seconds", 0.0) * prices.get("gpu", 0.0))
    return to_micro(round(tokens, 6))


def result_hash(buffers: Sequence[memoryview]) -> str:
    """Hash of a result's bytes, as the gateway saw them (receipts, redundancy votes)."""
    h = hashlib.blake2b(digest_size=32)
    for b in buffers:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def failure_hash(result: Result) -> str:
    """A failed task's receipt names what it failed with, hashed like a result."""
    err = result.error
    text = f"{result.status}|{result.code}|{err.module}.{err.type}|{err.message}" if err else (
        f"{result.status}|{result.code}")
    return result_hash([memoryview(text.encode())])


@dataclass(frozen=True, slots=True)
class Charge:
    """One settlement's outcome for the hub: the running cost and whether the escrow is spent."""

    charged_micro: int
    fee_micro: int
    spent: bool

    @property
    def cost(self) -> float:
        return to_tokens(self.charged_micro)


class Billing:
    """Prices, escrows and receipts for one gateway."""

    def __init__(self, ledger: Ledger, identity: Identity, default_escrow: float = 1.0) -> None:
        self.ledger = ledger
        self.identity = identity
        self.default_escrow_micro = to_micro(default_escrow)

    def escrow_for(self, spec: TaskSpec) -> int:
        if spec.budget is not None:
            return to_micro(spec.budget)
        if spec.max_price is not None and spec.timeout is not None:
            return to_micro(spec.max_price * spec.resources.get("cpus", 1) * spec.timeout)
        return self.default_escrow_micro

    def hold(self, items: Sequence[tuple[str, str, TaskSpec]]) -> list[LedgerError | None]:
        """Escrow for each ``(task_id, account, spec)``: None, or why it was refused
        (:class:`InsufficientFunds` when the balance is short)."""
        return self.ledger.hold_many(
            [(task_id, account, self.escrow_for(spec)) for task_id, account, spec in items])

    def settle(self, items: Sequence[tuple[str, str, dict, dict, bool]]) -> list[Charge | None]:
        """Settle ``(task_id, provider_account, usage, prices, final)`` cumulatively, in one
        transaction; None for a task the ledger refused (logged)."""
        results = self.ledger.settle_many(
            [(tid, acct, price_micro(usage, prices), final)
             for tid, acct, usage, prices, final in items])
        charges: list[Charge | None] = []
        for (tid, *_), res in zip(items, results, strict=True):
            if isinstance(res, LedgerError):
                log.error("settlement of %s refused: %s", tid, res)
                charges.append(None)
            else:
                charges.append(Charge(res.charged_micro, res.fee_micro, res.capped))
        return charges

    def receipt(self, charge: Charge, task_id: str, client: str, provider: str, usage: dict,
                prices: dict, digest: str) -> dict:
        """The signed record of a final settlement."""
        return make_receipt(self.identity, task_id=task_id, client=client, provider=provider,
                            usage=usage, prices=prices, amount_micro=charge.charged_micro,
                            fee_micro=charge.fee_micro, result_hash=digest,
                            settled_at=time.time())

    def refund(self, task_ids: Sequence[str]) -> None:
        for tid, res in zip(task_ids, self.ledger.refund_many(task_ids), strict=True):
            if isinstance(res, LedgerError):
                log.error("refund of %s refused: %s", tid, res)

    def balance(self, account: str) -> float:
        return to_tokens(self.ledger.balance(account))

    def earnings(self, account: str) -> float:
        return to_tokens(self.ledger.earnings(account))
