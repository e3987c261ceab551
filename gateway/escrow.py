"""Escrow: token units, money errors, the escrow lifecycle table and its arithmetic.

Shared by the two places that keep escrows: :mod:`gateway.ledger` (the SQLite rows, the truth on
disk) and :mod:`gateway.accounts` (the gateway core's in-memory books, which decide at once and
hand the same movements to the ledger in group commits). Both call :func:`settle_step` and
:func:`refund_step`, so the two can never compute a settlement differently.

Must never: take a float amount (``to_micro`` is the edge), or move a token the table forbids.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum

log = logging.getLogger(__name__)

MICRO = 1_000_000
MINT, FEES, ESCROW_PREFIX = "mint", "fees", "escrow:"
#: Largest amount one call may move: 2**53 micro (~9e9 tokens) is exact as a float and keeps
#: every SUM in SQLite's 64-bit integers far from overflow.
MAX_MICRO = 2**53


def to_micro(tokens: float) -> int:
    """Tokens as users type them to micro-tokens, rounded half-even to the nearest micro-token.

    Goes through the float's shortest repr, so ``to_micro(0.1) == 100_000`` exactly.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int | float | Decimal):
        raise TypeError(f"tokens must be a number, not {type(tokens).__name__}")
    if isinstance(tokens, float):
        if not math.isfinite(tokens):
            raise ValueError(f"tokens must be finite, not {tokens}")
        tokens = Decimal(float.__repr__(tokens))  # float subclasses may repr otherwise
    return int((Decimal(tokens) * MICRO).to_integral_value())


def to_tokens(micro: int) -> float:
    """Micro-tokens to float tokens, for display and the client API only."""
    return micro / MICRO


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose."""


class InsufficientFunds(LedgerError):
    """The client's balance cannot cover the hold; nothing was moved."""

    def __init__(self, account: str, balance_micro: int, needed_micro: int, task_id: str) -> None:
        self.account, self.balance_micro, self.needed_micro = account, balance_micro, needed_micro
        super().__init__(
            f"account {account} has {to_tokens(balance_micro):g} tokens available but task"
            f" {task_id.split('~', 1)[0]} needs {to_tokens(needed_micro):g} held in escrow; lower"
            f" budget= or max_price=, or get tokens: a development gateway's --faucet, or its"
            f" operator runs `decompute-gateway mint {account} AMOUNT --db FILE`"
        )


class EscrowStateError(LedgerError):
    """A transition the escrow table forbids, or a task with no (or already an) escrow."""


class LedgerInvariantError(LedgerError):
    """``check()`` found the books inconsistent; the message lists every discrepancy."""


class EscrowState(StrEnum):
    HELD = "held"
    SETTLED = "settled"
    REFUNDED = "refunded"


class EscrowEvent(StrEnum):
    PAY = "pay"  # a partial settlement: tokens move from escrow to a provider
    SETTLE = "settle"  # final: pay what is due, refund the leftover, close
    REFUND = "refund"  # close with nothing ever paid: everything goes back to the client
    REPLAY = "replay"  # moves no tokens: a repeated heartbeat or refund, or usage past the cap


# Every allowed escrow transition, in one place (h11's _state.py style); anything else raises.
# refund() after a partial payment is the SETTLE event: that escrow ends settled, not refunded.
ESCROW_TRANSITIONS: dict[EscrowState, dict[EscrowEvent, EscrowState]] = {
    EscrowState.HELD: {
        EscrowEvent.PAY: EscrowState.HELD,
        EscrowEvent.SETTLE: EscrowState.SETTLED,
        EscrowEvent.REFUND: EscrowState.REFUNDED,
        EscrowEvent.REPLAY: EscrowState.HELD,
    },
    EscrowState.SETTLED: {EscrowEvent.REPLAY: EscrowState.SETTLED},
    EscrowState.REFUNDED: {EscrowEvent.REPLAY: EscrowState.REFUNDED},
}


def escrow_transition(task_id: str, state: EscrowState, event: EscrowEvent) -> EscrowState:
    """The state after ``event``, or ``EscrowStateError`` when the table forbids it."""
    new = ESCROW_TRANSITIONS[state].get(event)
    if new is None:
        raise EscrowStateError(
            f"task {task_id}: escrow is {state}, it cannot take a {event}; a closed escrow only"
            " accepts repeats of what it already settled (new usage after final is not paid)"
        )
    if new is not state:
        log.debug("escrow %s: %s --%s--> %s", task_id, state, event, new)
    return new


@dataclass(frozen=True, slots=True)
class SettleResult:
    """Task-level totals after a settle or refund; ``charged == provider + fee`` always."""

    task_id: str
    charged_micro: int  # taken from the client's escrow so far, all providers together
    provider_micro: int  # paid to the task's providers so far, all together
    fee_micro: int  # kept as fees so far
    refunded_micro: int  # returned to the client (non-zero only once the escrow is closed)
    capped: bool  # some provider's cumulative usage exceeded what the hold could pay
    state: str = EscrowState.HELD.value


@dataclass(slots=True)
class Share:
    """One provider's part of one escrow: its highest reported cost, and what it was paid."""

    reported: int = 0
    charged: int = 0
    fee: int = 0


@dataclass(slots=True)
class Escrow:
    """One task's escrow: what was held, charged (provider pay + fee), kept as fee, refunded."""

    task_id: str
    client: str
    held: int
    charged: int = 0
    fee: int = 0
    refunded: int = 0
    state: EscrowState = EscrowState.HELD
    shares: dict[str, Share] = field(default_factory=dict)
    #: A share not loaded here (the ledger reads only the one it settles) is capped.
    other_capped: bool = False

    @property
    def left(self) -> int:
        """Micro-tokens still in escrow."""
        return self.held - self.charged - self.refunded

    def copy(self) -> Escrow:
        """A snapshot (its shares copied too)."""
        return replace(self, shares={k: replace(v) for k, v in self.shares.items()})

    @property
    def capped(self) -> bool:
        """Some provider reported more than the escrow could pay it."""
        return self.other_capped or any(s.reported > s.charged for s in self.shares.values())


@dataclass(frozen=True, slots=True)
class Step:
    """What one settlement or refund moves out of an escrow (each amount >= 0)."""

    pay: int = 0  # to the provider
    fee: int = 0  # to the gateway's fees
    refund: int = 0  # back to the client
    share_changed: bool = False  # the provider's share row must be written


def settle_step(escrow: Escrow, provider: str, cumulative_micro: int, final: bool,
                fee_ppm: int) -> Step:
    """Settle ``provider``'s CUMULATIVE cost on ``escrow`` (mutated), idempotently.

    The provider is owed ``cumulative - already charged for it``, capped by what is left in
    escrow, so a repeated or smaller cumulative moves nothing. Each provider of a task is tracked
    on its own; together they never exceed the hold. The fee is ``floor(charged * ppm / 1e6)`` of
    the provider's cumulative charge, moved as the difference from its previous fee, so however a
    charge is split into settlements the totals agree to the micro-token. ``final`` refunds the
    leftover and closes the escrow.
    """
    share = escrow.shares.get(provider)
    old = (share.reported, share.charged, share.fee) if share else None
    if share is None:
        share = escrow.shares[provider] = Share()
    if escrow.state is not EscrowState.HELD:
        more = cumulative_micro > share.reported
        escrow_transition(escrow.task_id, escrow.state,
                          EscrowEvent.PAY if more else EscrowEvent.REPLAY)
        if old is None:
            del escrow.shares[provider]
        return Step()
    reported = max(share.reported, cumulative_micro)
    delta = min(reported - share.charged, escrow.left)
    event = EscrowEvent.SETTLE if final else EscrowEvent.PAY if delta else EscrowEvent.REPLAY
    escrow.state = escrow_transition(escrow.task_id, escrow.state, event)
    fee_delta = (share.charged + delta) * fee_ppm // MICRO - share.fee if delta else 0
    share.reported = reported
    share.charged += delta
    share.fee += fee_delta
    escrow.charged += delta
    escrow.fee += fee_delta
    leftover = escrow.left if final else 0
    escrow.refunded += leftover
    changed = old is None or delta > 0 or reported != old[0]
    return Step(pay=delta - fee_delta, fee=fee_delta, refund=leftover, share_changed=changed)


def refund_step(escrow: Escrow) -> Step:
    """Close ``escrow`` (mutated), returning what is left to the client: ``refunded`` if nothing
    was ever paid, else ``settled``. A closed escrow refunds nothing (a repeat)."""
    if escrow.state is not EscrowState.HELD:
        escrow_transition(escrow.task_id, escrow.state, EscrowEvent.REPLAY)
        return Step()
    escrow.state = escrow_transition(
        escrow.task_id, escrow.state,
        EscrowEvent.SETTLE if escrow.charged else EscrowEvent.REFUND)
    left = escrow.left
    escrow.refunded += left
    return Step(refund=left)


def result_of(escrow: Escrow) -> SettleResult:
    """Task-level totals of ``escrow``: a settlement's answer."""
    return SettleResult(escrow.task_id, escrow.charged, escrow.charged - escrow.fee, escrow.fee,
                        escrow.refunded, escrow.capped, escrow.state.value)
