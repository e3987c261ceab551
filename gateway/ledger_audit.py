"""The ledger's books check: totals by account kind and the full re-derivation of every balance.

Owns ``LedgerTotals`` (minted vs. Σ user balances + Σ open escrow + fees) and the audit that
re-derives each cached balance from the transfer rows and each escrow record from its
per-provider rows. Kept apart from ``gateway.ledger`` because it only reads: it moves no money,
so the code that does (and its transactions) stays short and the audit can be read on its own.
Functions take an open ``sqlite3`` connection (inside the caller's read transaction) or the rows
read from it; they never open, commit or lock anything themselves.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.escrow import (
    ESCROW_PREFIX,
    ESCROW_TRANSITIONS,
    FEES,
    MINT,
    EscrowState,
    LedgerInvariantError,
)

#: The rows ``check_books`` audits: derived balances, accounts, escrows with per-provider sums.
Books = tuple[dict[str, int], list[tuple], list[tuple]]


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    minted: int
    balances: int  # Σ user accounts
    escrow: int  # Σ open escrow
    fees: int

    @property
    def conserved(self) -> bool:
        return self.minted == self.balances + self.escrow + self.fees


def totals_of(rows: Iterable[tuple[str, int | None]]) -> LedgerTotals:
    """``LedgerTotals`` from (account kind, Σ balance) rows."""
    sums = {kind: total or 0 for kind, total in rows}
    return LedgerTotals(minted=-sums.get(MINT, 0), balances=sums.get("user", 0),
                        escrow=sums.get("escrow", 0), fees=sums.get(FEES, 0))


def cached_totals(db: sqlite3.Connection) -> LedgerTotals:
    """From the cached balances (cheap enough for /metrics); ``check_books`` uses the rows."""
    return totals_of(db.execute("SELECT kind, SUM(balance) FROM accounts GROUP BY kind"))


def read_books(db: sqlite3.Connection) -> Books:
    """Everything ``check_books`` needs, read in the caller's one snapshot."""
    derived = dict(db.execute(
        "SELECT account, SUM(delta) FROM (SELECT credit AS account, amount AS delta"
        " FROM transfers UNION ALL SELECT debit, -amount FROM transfers) GROUP BY account"))
    accounts = db.execute("SELECT name, kind, balance FROM accounts").fetchall()
    escrows = db.execute(
        "SELECT e.task_id, e.held - e.charged - e.refunded, e.charged, e.fee, e.state,"
        " COALESCE(SUM(u.charged), 0), COALESCE(SUM(u.fee), 0) FROM escrows e"
        " LEFT JOIN escrow_usage u ON u.task_id = e.task_id GROUP BY e.task_id").fetchall()
    return derived, accounts, escrows


def check_books(books: Books, live: Iterable[str] | None = None) -> None:
    """Re-derive every balance from the transfer rows and the escrow records from the
    per-provider rows; raise ``LedgerInvariantError`` listing each discrepancy.

    ``live``, when given, names the escrows whose tasks are still open (the hub knows them):
    an escrow held for any other task, finished or gone, is a discrepancy too.
    """
    derived, accounts, escrows = books
    unknown = derived.keys() - {name for name, _, _ in accounts}
    problems = [f"rows name unknown account {name!r}" for name in unknown]
    by_kind: dict[str, int] = {}
    for name, kind, cached in accounts:
        real = derived.get(name, 0)
        by_kind[kind] = by_kind.get(kind, 0) + real
        if cached != real:
            problems.append(f"{name}: cached balance {cached} != {real} from the rows")
        if kind != MINT and real < 0:
            problems.append(f"{name}: negative balance {real}")
    if not (totals := totals_of(by_kind.items())).conserved:
        problems.append(f"not conserved: {totals}")
    for task_id, left, charged, fee, state, u_charged, u_fee in escrows:
        in_rows = derived.get(ESCROW_PREFIX + task_id, 0)
        if in_rows != left or left < 0 or (left and state != EscrowState.HELD):
            problems.append(f"escrow {task_id} ({state}): rows hold {in_rows}, record {left}")
        if (charged, fee) != (u_charged, u_fee) or state not in ESCROW_TRANSITIONS:
            problems.append(f"escrow {task_id} ({state}): charged/fee {charged}/{fee} !="
                            f" per-provider {u_charged}/{u_fee}")
    if live is not None:
        live = set(live)
        stale = [t for t, _, _, _, state, _, _ in escrows
                 if state == EscrowState.HELD and t not in live]
        problems += [f"escrow {t} is held for a task that is finished or gone"
                     for t in stale[:20]]
        if len(stale) > 20:
            problems.append(f"... and {len(stale) - 20} more such escrows")
    if problems:
        raise LedgerInvariantError("; ".join(problems))
