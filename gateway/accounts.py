"""The gateway core's books: balances and open escrows in memory, decided at once.

The core must never wait on SQLite for one task, yet a hold must be refused at submit when the
balance is short and a settlement must know at once whether the escrow is spent. So the core keeps
the books itself: every account it serves is loaded once from the ledger (the shell does that, off
the loop), and from then on holds, settlements and refunds are computed here with the very same
arithmetic as the ledger (:mod:`gateway.escrow`) and appended to a journal
(:mod:`gateway.journal`) that the accounting worker commits in groups.

If the worker fails an op, the books undo exactly what they predicted for that escrow since the
disk last agreed (its snapshot and the movements since), so memory and disk agree again; the core
then closes the escrow with a recovery refund. Movements someone else wrote into the file (an
operator's ``mint``) are reported by the worker and added here.

Must never: move money for an account that was not loaded, or let a balance go negative.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from gateway.escrow import (
    Escrow,
    EscrowState,
    EscrowStateError,
    InsufficientFunds,
    LedgerError,
    SettleResult,
    refund_step,
    result_of,
    settle_step,
)
from gateway.journal import Hold, Leaf, Op, Refund, Settle

log = logging.getLogger(__name__)

#: Closed escrows kept in memory, newest last: a late repeat of a settlement (a heartbeat that
#: crossed the result) replays against them instead of failing.
RECENTLY_CLOSED = 10_000


@dataclass(slots=True)
class _Unconfirmed:
    """What the books did to one escrow since the disk last agreed: enough to undo it."""

    before: Escrow | None  # the escrow as the disk has it (None: no hold on disk yet)
    moves: list[tuple[str, int]] = field(default_factory=list)  # (account, delta) in memory
    earned: list[tuple[str, int]] = field(default_factory=list)  # (provider, pay)
    seq: int = 0  # the journal that holds its latest op


class AccountNotLoaded(LedgerError):
    """A bug: money would move for an account the shell never loaded."""


class Accounts:
    """Balances, escrows and the journal of what was decided since the last commit."""

    def __init__(self, fee_ppm: int = 0) -> None:
        self.fee_ppm = fee_ppm
        self.balances: dict[str, int] = {}
        self.earnings: Counter[str] = Counter()
        self.held: Counter[str] = Counter()  # by client: micro-tokens in its open escrows
        self.escrows: dict[str, Escrow] = {}
        self._closed: OrderedDict[str, Escrow] = OrderedDict()
        self._unconfirmed: dict[str, _Unconfirmed] = {}
        self.journal: list[Op] = []
        self.seq = 0  # journals handed to the worker so far

    # -- accounts --------------------------------------------------------------------------------

    def loaded(self, account: str) -> bool:
        return account in self.balances

    def load(self, account: str, balance: int, earnings: int) -> None:
        """The ledger's figures for an account the books do not hold yet (a later load of the
        same account is stale: the books already moved money for it)."""
        if account not in self.balances:
            self.balances[account] = balance
            self.earnings[account] = earnings

    def external(self, moves: dict[str, int]) -> None:
        """Movements written into the file by someone else (an operator's mint)."""
        for account, delta in moves.items():
            if account in self.balances:
                self.balances[account] += delta
                log.info("account %s: %+d micro-tokens from outside the gateway", account[:16],
                         delta)

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)

    # -- escrow ----------------------------------------------------------------------------------

    def hold(self, task_id: str, client: str, amount: int) -> LedgerError | None:
        """Hold ``amount`` for ``task_id``; None, or why not (nothing moved then)."""
        if client not in self.balances:
            return AccountNotLoaded(f"account {client} is not loaded")
        if task_id in self.escrows or task_id in self._closed:
            return EscrowStateError(f"task {task_id} already has an escrow; use a new task id")
        if self.balances[client] < amount:
            return InsufficientFunds(client, self.balances[client], amount, task_id)
        self.escrows[task_id] = Escrow(task_id, client, amount)
        self._track(None, task_id)
        self._move(task_id, client, -amount)
        self.held[client] += amount
        self.journal.append(Hold(task_id, client, amount))
        return None

    def settle(self, task_id: str, provider: str, cumulative: int, final: bool,
               fee_ppm: int | None = None) -> SettleResult | LedgerError:
        """Pay ``provider`` up to its cumulative cost (see :func:`gateway.escrow.settle_step`)."""
        escrow = self.escrows.get(task_id) or self._closed.get(task_id)
        fee_ppm = self.fee_ppm if fee_ppm is None else fee_ppm
        if escrow is None:
            return EscrowStateError(f"task {task_id} has no escrow; hold() must come first")
        if provider not in self.balances:
            return AccountNotLoaded(f"provider account {provider} is not loaded")
        if escrow.state is not EscrowState.HELD:  # a repeat against a closed escrow, or a
            try:  # payment after it closed (refused)
                settle_step(escrow, provider, cumulative, final, fee_ppm)
            except LedgerError as exc:
                return exc
            return result_of(escrow)
        self._track(escrow)
        step = settle_step(escrow, provider, cumulative, final, fee_ppm)
        self._move(task_id, provider, step.pay)
        self.earnings[provider] += step.pay
        self._unconfirmed[task_id].earned.append((provider, step.pay))
        self._move(task_id, escrow.client, step.refund)
        self.held[escrow.client] -= step.pay + step.fee + step.refund
        self.journal.append(Settle(task_id, provider, cumulative, final,
                                   None if fee_ppm == self.fee_ppm else fee_ppm))
        self._maybe_closed(escrow)
        return result_of(escrow)

    def close(self, task_id: str) -> tuple[int, int] | None:
        """Refund what is left of ``task_id``'s escrow; its (charged, fee) in all, or None if it
        has none (a free task)."""
        escrow = self.escrows.get(task_id)
        if escrow is None:
            done = self._closed.get(task_id)
            return None if done is None else (done.charged, done.fee)
        self._track(escrow)
        step = refund_step(escrow)
        self._move(task_id, escrow.client, step.refund)
        self.held[escrow.client] -= step.refund
        self.journal.append(Refund(task_id))
        self._maybe_closed(escrow)
        return escrow.charged, escrow.fee

    def log(self, leaf: Leaf) -> None:
        """A final settlement's leaf, committed with the ops before it."""
        self.journal.append(leaf)

    def is_open(self, task_id: str) -> bool:
        return task_id in self.escrows

    def open_escrows(self) -> set[str]:
        return set(self.escrows)

    # -- the worker's answers ------------------------------------------------------------------

    def take_journal(self) -> tuple[int, list[Op]]:
        """The ops decided since the last call, numbered, for the worker."""
        self.seq += 1
        ops, self.journal = self.journal, []
        return self.seq, ops

    def confirmed(self, seq: int) -> None:
        """Journals up to ``seq`` are on disk: what they did needs no undo any more."""
        done = [t for t, u in self._unconfirmed.items() if u.seq <= seq]
        for task_id in done:
            del self._unconfirmed[task_id]

    def undo(self, task_id: str) -> Escrow | None:
        """The worker failed an op of this escrow: put memory back to what the disk has (and
        refuses every later op of it until a recovery refund). Returns the escrow as the disk
        has it, None if it holds nothing there."""
        u = self._unconfirmed.pop(task_id, None)
        if u is None:
            return self.escrows.get(task_id)
        for account, delta in reversed(u.moves):
            self.balances[account] -= delta
        for provider, pay in u.earned:
            self.earnings[provider] -= pay
        current = self.escrows.pop(task_id, None) or self._closed.pop(task_id, None)
        if current is not None:
            self.held[current.client] -= current.left
        if u.before is None:
            return None
        self.escrows[task_id] = u.before
        self.held[u.before.client] += u.before.left
        return u.before

    def recover(self, task_id: str) -> None:
        """After :meth:`undo`: close the escrow as the disk has it (the worker lifts its refusal
        on this op)."""
        escrow = self.escrows.get(task_id)
        if escrow is not None:
            step = refund_step(escrow)
            self.balances[escrow.client] = self.balances.get(escrow.client, 0) + step.refund
            self.held[escrow.client] -= step.refund
            self._maybe_closed(escrow)
        self.journal.append(Refund(task_id, recovery=True))

    # -- internals -------------------------------------------------------------------------------

    def _track(self, escrow: Escrow | None, new_id: str = "") -> None:
        """Before an op on ``escrow`` (None: a new hold of ``new_id``): remember the disk's view
        of it, if this is its first op since the disk last agreed."""
        task_id = new_id if escrow is None else escrow.task_id
        u = self._unconfirmed.get(task_id)
        if u is None:
            u = self._unconfirmed[task_id] = _Unconfirmed(None if escrow is None else escrow.copy())
        u.seq = self.seq + 1

    def _move(self, task_id: str, account: str, delta: int) -> None:
        if not delta:
            return
        self.balances[account] = self.balances.get(account, 0) + delta
        self._unconfirmed[task_id].moves.append((account, delta))

    def _maybe_closed(self, escrow: Escrow) -> None:
        if escrow.state is EscrowState.HELD:
            return
        self.escrows.pop(escrow.task_id, None)
        self._closed[escrow.task_id] = escrow
        while len(self._closed) > RECENTLY_CLOSED:
            self._closed.popitem(last=False)
