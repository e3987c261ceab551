"""Outcomes the core makes itself: error results, and the receipt-log leaf of a settlement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gateway import chunks
from gateway import protocol as p
from gateway.billing import (
    Charge,
    Settled,
    Share,
    Unfundable,
    failure_hash,
    result_hash,
)
from gateway.ledger import InsufficientFunds
from gateway.tasks import Task
from gateway.verify import Ballot


def failure(key: str, code: p.ErrorCode, message: str, type_: str = "") -> p.Result:
    """A gateway-made error result; ``type_`` names the exception the client should raise."""
    return p.Result(
        key=key, status="error", code=code.value,
        error=p.RemoteFailure(type=type_ or code.value, module="decompute", message=message),
    )


def hold_refusal(key: str, why: Exception) -> p.Result:
    """A refused escrow: short funds say so; anything else is the gateway's own problem."""
    if isinstance(why, InsufficientFunds):
        return failure(key, p.ErrorCode.FUNDS, str(why), "InsufficientFunds")
    if isinstance(why, Unfundable):
        return failure(key, p.ErrorCode.NO_MATCH, str(why), "NoMatchingProvider")
    return failure(key, p.ErrorCode.INTERNAL, f"the ledger refused the escrow: {why}")


def ledger_failure(key: str, why: str) -> p.Result:
    """A task the ledger could not record: the client is told, and nothing was charged for it
    beyond what the ledger had recorded before."""
    return failure(key, p.ErrorCode.INTERNAL,
                   f"the gateway's ledger could not record task {key} ({why}); its escrow was "
                   f"returned as the ledger had it, and the task was stopped. Submit it again; "
                   f"if this repeats, tell the gateway's operator", "LedgerError")


def outcome_digest(result: p.Result, bufs: Sequence[memoryview]) -> str:
    """A result's hash as leaves and votes name it: its bytes', its failure's, or (a chunk)
    one over each item's hash."""
    if result.status != "finished":
        return failure_hash(result)
    return chunks.outcome_hash(result, bufs)


def settled_leaf(task: Task, charge: Charge, outcome: str,
             shares: list[tuple[str, str, dict, dict, Charge | None]],
             items: list[str] | None = None) -> Settled:
    """The leaf of a final settlement: ``shares`` are ``(provider account, its result hash,
    usage, prices, its charge)``; ``charge`` is what the client paid in all; ``items`` a
    chunk's per-item result hashes."""
    return Settled(
        task_id=task.bill_id, client=task.account, function_hash=task.spec.func,
        input_hash=result_hash(task.payload), outcome=outcome,
        amount_micro=charge.charged_micro, fee_micro=charge.fee_micro,
        shares=tuple(Share(account, digest, dict(usage), dict(prices),
                           c.charged_micro - c.fee_micro if c is not None else 0)
                     for account, digest, usage, prices, c in shares), items=items)


def vote_leaf(win: Ballot, unpaid: Sequence[Ballot],
                  paid: list[tuple[Ballot, Charge | None]]) -> Settled:
    """A decided vote's leaf: every ballot (the out-voted paid nothing), the outcome, and the
    sum of what the agreeing replicas were paid."""
    shares = [(b.provider_account, b.digest, b.task.usage, b.prices, c) for b, c in paid]
    shares += [(b.provider_account, b.digest, b.task.usage, b.prices, None) for b in unpaid]
    total = Charge(sum(c.charged_micro for _, c in paid if c is not None),
                   sum(c.fee_micro for _, c in paid if c is not None), spent=False)
    return settled_leaf(win.task, total, win.digest, shares,
                    chunks.item_hashes(win.result, win.buffers))


#: A task the gateway fails itself: (task, code, message, exception type for the client).
Failing = tuple[Task, p.ErrorCode, str, str]


def unasked_cancel(result: p.Result, key: str, provider_id: str) -> p.Result:
    """A provider reported ``cancelled`` for a task nobody cancelled: an error of that task."""
    return replace(result, status="error", nb=0, code=p.ErrorCode.LOST.value,
                   error=p.RemoteFailure(type="ProviderLost", module="decompute", message=(
                       f"provider {provider_id} stopped task {key} without being asked (it "
                       f"reported it cancelled); submit it again")))
