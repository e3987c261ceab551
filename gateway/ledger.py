"""The token ledger: double-entry bookkeeping of integer micro-tokens in SQLite.

Owns: accounts, every movement of tokens (one ``transfers`` row each: the amount leaves the
``debit`` account and enters the ``credit`` account), one escrow per task with its lifecycle, and
the conservation check ``minted == Σ user balances + Σ open escrow + fees`` (the check itself is
in ``gateway.ledger_audit``; the SQL schema and its migrations in ``gateway.ledger_schema``).

The file (and its WAL and shared-memory files) is created mode 0600: who paid whom is nobody
else's business, least of all a local provider's tasks. Each escrow remembers its task (the id
before ``~``) and whether a final settlement closed it, so a task resubmitted after a restart that
lost its result is never charged twice (``settled_tasks``).

Must never: keep money in Python state between calls (the database is the only truth, so several
``Ledger`` objects or processes on one file stay exact), move tokens outside one transaction, let a
user account go negative, or take a float amount (floats live at the edge: ``to_micro``).

The interface is narrow so that, past one gateway, a PostgreSQL module can replace this one method
for method (``SELECT ... FOR UPDATE`` where this uses ``BEGIN IMMEDIATE``) and nothing above it
changes: callers pass account ids, task ids and micro-token ints, and never see SQL.

Durability: WAL with ``synchronous=NORMAL``. COMMIT returns once the WAL frames were written with
write(): they are in the OS page cache and survive a SIGKILL of the gateway. WAL frames carry
checksums, so even an OS crash or power cut only rolls back to an earlier consistent state (losing
the last few commits). ``FULL`` adds an fsync per commit (~0.2 ms on this machine, about 10x a
NORMAL commit) on the hottest path, a settlement per heartbeat per task; pass
``synchronous="FULL"`` when a power cut must not lose the last settlements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from gateway.escrow import (  # re-exported: the ledger's public names, as before
    ESCROW_PREFIX,
    ESCROW_TRANSITIONS,
    FEES,
    MAX_MICRO,
    MICRO,
    MINT,
    Escrow,
    EscrowEvent,
    EscrowState,
    EscrowStateError,
    InsufficientFunds,
    LedgerError,
    LedgerInvariantError,
    SettleResult,
    Share,
    Step,
    escrow_transition,
    refund_step,
    result_of,
    settle_step,
    to_micro,
    to_tokens,
)

__all__ = [
    "ESCROW_PREFIX", "ESCROW_TRANSITIONS", "FEES", "MAX_MICRO", "MICRO", "MINT", "EscrowEvent",
    "EscrowState", "EscrowStateError", "InsufficientFunds", "Ledger", "LedgerError",
    "LedgerInvariantError", "LedgerTotals", "SettleResult", "Transfer", "escrow_transition",
    "to_micro", "to_tokens",
]

from gateway.journal import Hold, LedgerOp, Refund, Settle
from gateway.ledger_audit import (  # LedgerTotals re-exported: a public name, as before
    LedgerTotals,
    cached_totals,
    check_books,
    read_books,
)
from gateway.ledger_schema import MIGRATED as _MIGRATED
from gateway.ledger_schema import MIGRATIONS as _MIGRATIONS
from gateway.ledger_schema import SCHEMA as _SCHEMA

log = logging.getLogger(__name__)

T = TypeVar("T")

@dataclass(frozen=True, slots=True)
class Applied(Generic[T]):
    """What :meth:`Ledger.apply` did: failed escrows (id -> why), movements others wrote (account
    -> micro-tokens), loaded accounts (-> balance, earnings), the newest transfer id, ``then``'s
    value."""

    failed: dict[str, str]
    external: dict[str, int]
    loaded: dict[str, tuple[int, int]]
    last: int
    extra: T | None


@dataclass(frozen=True, slots=True)
class Transfer:
    """One ledger row: ``amount_micro`` left ``debit`` and entered ``credit``."""

    id: int
    ts: float
    debit: str
    credit: str
    amount_micro: int
    reason: str
    task_id: str | None


#: SQLite's default cap on host parameters in one statement is 999 (older builds): lookups of
#: many ids go in chunks of this many.
_CHUNK = 900


def _private(path: Path) -> None:
    """The ledger and its WAL/SHM files are the gateway's alone: mode 0600 (tasks of local
    providers, other users of the host, must not read who paid whom)."""
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f, 0o600)


def _check_micro(value: int, name: str, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int of micro-tokens, not {type(value).__name__}")
    if not (0 if allow_zero else 1) <= value <= MAX_MICRO:
        raise ValueError(f"{name} must be in [{0 if allow_zero else 1}, 2**53], not {value}")


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str, not {value!r}")
    if what == "account" and (value in (MINT, FEES) or value.startswith(ESCROW_PREFIX)):
        raise ValueError(f"{value!r} is a reserved ledger account, not a user account")


class Ledger:
    """The ledger on one SQLite file; thread-safe: one connection, one lock, one tx per call."""

    def __init__(self, path: str | Path, *, faucet_micro: int = 0, fee_percent: float = 0.0,
                 synchronous: str = "NORMAL") -> None:
        _check_micro(faucet_micro, "faucet_micro", allow_zero=True)
        if not 0.0 <= fee_percent <= 100.0:
            raise ValueError(f"fee_percent must be within [0, 100], not {fee_percent}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path, self.faucet_micro = Path(path), faucet_micro
        self._fee_ppm = round(fee_percent * 10_000)  # integer parts per million: exact fees
        self._lock = threading.Lock()
        if not self.path.exists():  # created private: never a moment readable by others
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        old_umask = os.umask(0o077)  # the -wal and -shm files SQLite creates, likewise
        try:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(escrows)")}
            for column, sql in _MIGRATIONS:
                if column not in columns:
                    db.execute(sql)
            db.executescript(_MIGRATED)
        finally:
            os.umask(old_umask)
        _private(self.path)
        self._db: sqlite3.Connection | None = db

    @property
    def fee_ppm(self) -> int:
        """The gateway's fee in parts per million of each charge."""
        return self._fee_ppm

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. Writes take the write lock up front (BEGIN IMMEDIATE), so two
        writers never deadlock on an upgrade; reads get a consistent WAL snapshot (BEGIN)."""
        with self._lock:
            db = self._db
            if db is None:
                raise LedgerError(f"ledger {self.path} is closed")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:  # including a failed COMMIT: never leave a transaction open
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # -- accounts ------------------------------------------------------------------------------

    def ensure_account(self, account: str) -> bool:
        """Create ``account`` on first sight and credit the faucet once; True if it was new.

        With a faucet (a development network), a known account found with nothing at all, no
        balance and nothing held, is topped up to the faucet again: a gateway restarted with
        ``--faucet`` in the same folder does not leave its known accounts stranded at 0.
        """
        _check_name(account, "account")
        now = time.time()
        with self._tx() as db:
            if self._ensure(db, account, now):
                return True
            if self.faucet_micro and not _one(
                    db, "SELECT balance FROM accounts WHERE name = ?", account)[0] and not _one(
                    db, "SELECT 1 FROM escrows WHERE client = ? AND state = 'held' LIMIT 1",
                    account):
                self._move(db, MINT, account, self.faucet_micro, "faucet top-up", None, now)
            return False

    def known(self, account: str) -> bool:
        """Whether ``account`` has ever been seen by this ledger."""
        with self._tx(write=False) as db:
            return _one(db, "SELECT 1 FROM accounts WHERE name = ? AND kind = 'user'",
                        account) is not None

    def mint(self, account: str, amount_micro: int, reason: str = "mint") -> None:
        _check_name(account, "account")
        _check_micro(amount_micro, "amount_micro", allow_zero=False)
        now = time.time()
        with self._tx() as db:
            self._ensure(db, account, now)
            self._move(db, MINT, account, amount_micro, reason, None, now)

    def balance(self, account: str) -> int:
        with self._tx(write=False) as db:
            row = _one(db, "SELECT balance FROM accounts WHERE name = ?", account)
        return row[0] if row else 0

    def earnings(self, account: str) -> int:
        """Total ever received by ``account`` as a provider (after fees)."""
        with self._tx(write=False) as db:
            return _one(db, "SELECT COALESCE(SUM(amount), 0) FROM transfers"
                        " WHERE credit = ? AND reason = 'pay'", account)[0]

    def history(self, account: str, limit: int = 50) -> list[Transfer]:
        """The newest ``limit`` movements into or out of ``account``, newest first."""
        with self._tx(write=False) as db:
            rows = db.execute("SELECT id, ts, debit, credit, amount, reason, task_id FROM transfers"
                              " WHERE debit = ? OR credit = ? ORDER BY id DESC LIMIT ?",
                              (account, account, limit)).fetchall()
        return [Transfer(*row) for row in rows]

    # -- escrow --------------------------------------------------------------------------------

    def hold(self, task_id: str, client: str, amount_micro: int) -> None:
        """Move ``amount_micro`` from ``client`` into ``escrow:<task_id>`` before the task runs."""
        with self._tx() as db:
            self._hold(db, task_id, client, amount_micro, time.time())

    def hold_many(self, items: Iterable[tuple[str, str, int]]) -> list[LedgerError | None]:
        """``hold`` for each ``(task_id, client, amount)`` in ONE transaction (a Submit batch).

        Each item succeeds or fails on its own (a savepoint each): the result lists None or
        the error (e.g. InsufficientFunds) per item, in order.
        """
        return self._batch(self._hold, items)

    def _hold(self, db: sqlite3.Connection, task_id: str, client: str, amount_micro: int,
              now: float) -> None:
        _check_name(task_id, "task_id")
        _check_name(client, "account")
        _check_micro(amount_micro, "amount_micro", allow_zero=True)
        if _one(db, "SELECT 1 FROM escrows WHERE task_id = ?", task_id):
            raise EscrowStateError(f"task {task_id} already has an escrow; use a new task id")
        self._ensure(db, client, now)  # rolled back with everything else if funds are short
        have = _one(db, "SELECT balance FROM accounts WHERE name = ?", client)[0]
        if have < amount_micro:
            raise InsufficientFunds(client, have, amount_micro, task_id)
        escrow = ESCROW_PREFIX + task_id
        db.execute("INSERT INTO accounts(name, kind, created) VALUES (?, 'escrow', ?)",
                   (escrow, now))
        db.execute("INSERT INTO escrows(task_id, client, held, state, created, task)"
                   " VALUES (?, ?, ?, 'held', ?, ?)",
                   (task_id, client, amount_micro, now, task_id.split("~", 1)[0]))
        self._move(db, client, escrow, amount_micro, "hold", task_id, now)

    def _batch(self, op: Any, items: Iterable[tuple]) -> list:
        """Run ``op(db, *item, now)`` per item in one transaction, a savepoint per item."""
        now, out = time.time(), []
        with self._tx() as db:
            for item in items:
                db.execute("SAVEPOINT item")
                try:
                    out.append(op(db, *item, now))
                except (LedgerError, ValueError) as exc:
                    db.execute("ROLLBACK TO item")
                    out.append(exc if isinstance(exc, LedgerError) else LedgerError(str(exc)))
                db.execute("RELEASE item")
        return out

    def settle(self, task_id: str, provider: str, cumulative_micro: int, *,
               final: bool) -> SettleResult:
        """Pay ``provider`` up to its reported CUMULATIVE usage cost for the task, idempotently.

        The provider is owed ``cumulative - already charged for it``, capped by what is left in
        escrow, so a repeated or smaller cumulative moves nothing. Each provider of a task (a
        retry elsewhere) is tracked on its own; together they never exceed the hold. The fee is
        ``floor(charged * ppm / 1e6)`` of the provider's cumulative charge, moved as the
        difference from its previous fee, so however a charge is split into settlements the
        totals agree to the micro-token. ``final`` refunds the leftover and closes the escrow.
        """
        with self._tx() as db:
            return self._settle(db, task_id, provider, cumulative_micro, final, time.time())

    def settle_many(self, items: Iterable[tuple[str, str, int, bool]]
                    ) -> list[SettleResult | LedgerError]:
        """``settle`` for each ``(task_id, provider, cumulative, final)`` in ONE transaction."""
        return self._batch(self._settle, items)

    def _settle(self, db: sqlite3.Connection, task_id: str, provider: str,
                cumulative_micro: int, final: bool, now: float,
                fee_ppm: int | None = None) -> SettleResult:
        _check_name(provider, "account")
        _check_micro(cumulative_micro, "cumulative_micro", allow_zero=True)
        escrow = self._escrow(db, task_id, provider)
        was_held = escrow.state is EscrowState.HELD
        step = settle_step(escrow, provider, cumulative_micro, final,
                           self._fee_ppm if fee_ppm is None else fee_ppm)
        if was_held:  # a closed escrow only takes repeats, which change nothing
            self._write(db, escrow, provider, step, now, final=final)
        return result_of(escrow)

    def refund(self, task_id: str) -> int:
        """Return all that is still held to the client and close the escrow; micro refunded.

        Idempotent: a closed escrow refunds 0. After partial payments the escrow ends settled.
        """
        with self._tx() as db:
            return self._refund(db, task_id, time.time())

    def refund_many(self, task_ids: Iterable[str]) -> list[int | LedgerError]:
        """``refund`` for each task in ONE transaction."""
        return self._batch(self._refund, ((t,) for t in task_ids))

    def apply(self, ops: Sequence[LedgerOp], *, seen: int, refused: Set[str] = frozenset(),
              loads: Sequence[str] = (),
              then: Callable[[sqlite3.Connection, set[str]], T] | None = None) -> Applied[T]:
        """Apply the core's journal in ONE transaction (the accounting worker's group commit).

        First, movements others wrote since transfer row ``seen`` (an operator's mint) are
        collected, and ``loads`` are created (faucet) and read. Then each op runs in a savepoint:
        one that fails is rolled back alone and fails every later op of its escrow, as do the
        ops of escrows in ``refused`` (a failure the core has not acknowledged yet) except their
        recovery refund. ``then(db, failed escrows)`` runs last in the same transaction (the
        receipt log's leaves), so a settlement and its leaf commit together.
        """
        now, failed = time.time(), {}
        with self._tx() as db:
            external: dict[str, int] = {}
            for debit, credit, amount in db.execute(
                    "SELECT debit, credit, amount FROM transfers WHERE id > ?", (seen,)):
                external[credit] = external.get(credit, 0) + amount
                external[debit] = external.get(debit, 0) - amount
            loaded = {}
            for account in loads:
                self._ensure(db, account, now)
                loaded[account] = (
                    _one(db, "SELECT balance FROM accounts WHERE name = ?", account)[0],
                    _one(db, "SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE credit = ?"
                         " AND reason = 'pay'", account)[0])
            for op in ops:
                if op.task_id in failed or (op.task_id in refused and not (
                        isinstance(op, Refund) and op.recovery)):
                    failed.setdefault(op.task_id, "an earlier ledger operation on this escrow"
                                                  " failed")
                    continue
                db.execute("SAVEPOINT op")
                try:
                    self._apply_one(db, op, now)
                except (LedgerError, ValueError, sqlite3.Error) as exc:
                    db.execute("ROLLBACK TO op")
                    failed[op.task_id] = f"{type(exc).__name__}: {exc}"
                db.execute("RELEASE op")
            extra = then(db, set(failed)) if then is not None else None
            last = _one(db, "SELECT COALESCE(MAX(id), 0) FROM transfers")[0]
        return Applied(failed, {a: d for a, d in external.items() if d}, loaded, last, extra)

    def _apply_one(self, db: sqlite3.Connection, op: LedgerOp, now: float) -> None:
        if isinstance(op, Hold):
            self._hold(db, op.task_id, op.client, op.amount, now)
        elif isinstance(op, Settle):
            self._settle(db, op.task_id, op.provider, op.cumulative, op.final, now, op.fee_ppm)
        elif not op.recovery or _one(db, "SELECT 1 FROM escrows WHERE task_id = ?", op.task_id):
            self._refund(db, op.task_id, now)  # a recovery of a hold never made: nothing to do

    def last_transfer(self) -> int:
        """The newest transfer row's id (the worker's starting point for outside movements)."""
        with self._tx(write=False) as db:
            return _one(db, "SELECT COALESCE(MAX(id), 0) FROM transfers")[0]

    def recover(self) -> list[str]:
        """At gateway start: refund every open escrow, since no task survives a restart."""
        now = time.time()
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT task_id FROM escrows WHERE state = 'held'")]
            for task_id in ids:
                self._refund(db, task_id, now)
        if ids:
            log.warning("ledger recovery refunded %d open escrow(s), e.g. %s", len(ids), ids[:5])
        return ids

    def held_among(self, task_ids: Iterable[str]) -> set[str]:
        """Which of ``task_ids`` have an escrow still held (a free task has none at all)."""
        return {row[0] for row in self._lookup(
            "SELECT task_id FROM escrows WHERE state = 'held' AND task_id IN ({})", task_ids)}

    def charged_of(self, task_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """task_id -> (charged, fee) in micro-tokens, for those of ``task_ids`` with an escrow."""
        rows = self._lookup("SELECT task_id, charged, fee FROM escrows WHERE task_id IN ({})",
                            task_ids)
        return {task_id: (charged, fee) for task_id, charged, fee in rows}

    def settled_tasks(self, tasks: Iterable[str]) -> set[str]:
        """Which of ``tasks`` (escrow ids before their ``~``: one per task, whatever the
        submission) already had a final settlement: their result was paid for once."""
        return {row[0] for row in self._lookup(
            "SELECT DISTINCT task FROM escrows WHERE final = 1 AND task IN ({})", tasks)}

    def settled_under(self, prefix: str) -> set[str]:
        """Tasks starting with ``prefix`` (a client session's id) that had a final settlement:
        after a restart, their resubmissions are charged nothing again."""
        with self._tx(write=False) as db:
            return {row[0] for row in db.execute(
                "SELECT DISTINCT task FROM escrows WHERE final = 1 AND task >= ? AND task < ?",
                (prefix, prefix + "\U0010ffff"))}

    def has_tasks_under(self, prefix: str) -> bool:
        """True if any escrow's task starts with ``prefix`` (e.g. a client session's id)."""
        with self._tx(write=False) as db:
            return _one(db, "SELECT 1 FROM escrows WHERE task >= ? AND task < ? LIMIT 1",
                        prefix, prefix + "\U0010ffff") is not None

    def held_by(self, account: str) -> int:
        """Micro-tokens of ``account``'s money in open escrow."""
        with self._tx(write=False) as db:
            return _one(db, "SELECT COALESCE(SUM(held - charged - refunded), 0) FROM escrows"
                        " WHERE client = ? AND state = 'held'", account)[0]

    def _lookup(self, sql: str, keys: Iterable[str]) -> list[tuple]:
        """Rows of ``sql`` (with one ``IN ({})``) over ``keys``, in chunks, in one snapshot."""
        keys, rows = list(keys), []
        with self._tx(write=False) as db:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                rows += db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def open_escrows(self) -> dict[str, int]:
        """task_id -> micro-tokens still held, for every escrow in state held."""
        with self._tx(write=False) as db:
            return dict(db.execute("SELECT task_id, held - charged - refunded FROM escrows"
                                   " WHERE state = 'held'").fetchall())

    def escrow_owner(self, task_id: str) -> str | None:
        """The client that funded ``task_id``'s escrow (open or closed); None if there is none."""
        with self._tx(write=False) as db:
            row = _one(db, "SELECT client FROM escrows WHERE task_id = ?", task_id)
        return row[0] if row else None

    # -- the books -----------------------------------------------------------------------------

    def totals(self) -> LedgerTotals:
        """From the cached balances (cheap enough for /metrics); ``check()`` uses the rows."""
        with self._tx(write=False) as db:
            return cached_totals(db)

    def check(self, live: Iterable[str] | None = None) -> None:
        """Re-derive every balance and escrow from the rows (``ledger_audit.check_books``);
        raise ``LedgerInvariantError`` listing each discrepancy, including, with ``live`` (the
        escrows whose tasks are still open), any escrow held for a task finished or gone."""
        with self._tx(write=False) as db:
            books = read_books(db)
        check_books(books, live)

    # -- internals: each runs inside its caller's transaction ----------------------------------

    def _ensure(self, db: sqlite3.Connection, account: str, now: float) -> bool:
        """First sight of a user account, wherever it happens (ensure_account, mint, hold, a
        provider's first pay), credits the faucet: exactly once, whoever sees it first."""
        new = db.execute("INSERT OR IGNORE INTO accounts(name, kind, created)"
                         " VALUES (?, 'user', ?)", (account, now)).rowcount == 1
        if new:
            self._move(db, MINT, account, self.faucet_micro, "faucet", None, now)
        return new

    @staticmethod
    def _move(db: sqlite3.Connection, debit: str, credit: str, amount: int, reason: str,
              task_id: str | None, now: float) -> None:
        if amount <= 0:  # a zero-sized movement leaves no row
            return
        db.execute("INSERT INTO transfers(ts, debit, credit, amount, reason, task_id)"
                   " VALUES (?, ?, ?, ?, ?, ?)", (now, debit, credit, amount, reason, task_id))
        db.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?", (amount, debit))
        db.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", (amount, credit))

    @staticmethod
    def _escrow(db: sqlite3.Connection, task_id: str, provider: str | None = None) -> Escrow:
        """The escrow's record, with ``provider``'s share (the one a settlement touches)."""
        row = _one(db, "SELECT client, held, charged, fee, refunded, state FROM escrows"
                   " WHERE task_id = ?", task_id)
        if row is None:
            raise EscrowStateError(f"task {task_id} has no escrow; hold() must come first")
        escrow = Escrow(task_id, row[0], row[1], row[2], row[3], row[4], EscrowState(row[5]))
        capped = _one(db, "SELECT EXISTS(SELECT 1 FROM escrow_usage WHERE task_id = ?"
                      " AND reported > charged)", task_id)[0]
        escrow.other_capped = bool(capped)  # the result says so, whichever share it is
        if provider is not None:
            share = _one(db, "SELECT reported, charged, fee FROM escrow_usage"
                         " WHERE task_id = ? AND provider = ?", task_id, provider)
            if share is not None:
                escrow.shares[provider] = Share(*share)
        return escrow

    def _write(self, db: sqlite3.Connection, escrow: Escrow, provider: str | None, step: Step,
               now: float, *, final: bool = False) -> None:
        """Record ``step`` of ``escrow``: its movements, its provider's share, its new totals."""
        name = ESCROW_PREFIX + escrow.task_id
        if step.pay or step.fee:
            self._ensure(db, provider, now)
        self._move(db, name, provider, step.pay, "pay", escrow.task_id, now)
        self._move(db, name, FEES, step.fee, "fee", escrow.task_id, now)
        self._move(db, name, escrow.client, step.refund, "refund", escrow.task_id, now)
        if provider is not None and step.share_changed:
            s = escrow.shares[provider]
            db.execute("INSERT INTO escrow_usage(task_id, provider, reported, charged, fee)"
                       " VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id, provider) DO UPDATE SET"
                       " reported = excluded.reported, charged = excluded.charged,"
                       " fee = excluded.fee", (escrow.task_id, provider, s.reported, s.charged,
                                               s.fee))
        closed = escrow.state is not EscrowState.HELD
        db.execute("UPDATE escrows SET charged = ?, fee = ?, refunded = ?, state = ?,"
                   " closed = COALESCE(closed, ?), final = MAX(final, ?) WHERE task_id = ?",
                   (escrow.charged, escrow.fee, escrow.refunded, escrow.state.value,
                    now if closed else None, int(final), escrow.task_id))

    def _refund(self, db: sqlite3.Connection, task_id: str, now: float) -> int:
        escrow = self._escrow(db, task_id)
        was_held = escrow.state is EscrowState.HELD
        step = refund_step(escrow)
        if was_held:
            self._write(db, escrow, None, step, now)
        return step.refund


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    return db.execute(sql, args).fetchone()

