"""Ledger work: the movements the gateway core decided, on their way to the SQLite file.

The core's books (:mod:`gateway.accounts`) decide holds and settlements at once, in memory, and
append what they decided here; the accounting worker (:mod:`gateway.accounting_worker`) applies
the ops of many turns in one transaction (a group commit), appends the receipt-log leaves in that
same transaction and signs one tree head for them. A settlement and its leaf are therefore
committed together or not at all.

Every op names the escrow it touches, so a failure can be traced to the tasks it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hold:
    """Move ``amount`` micro-tokens from ``client`` into the escrow of ``task_id``."""

    task_id: str
    client: str
    amount: int


@dataclass(frozen=True, slots=True)
class Settle:
    """Pay ``provider`` up to its CUMULATIVE cost on ``task_id``; ``final`` closes the escrow."""

    task_id: str
    provider: str
    cumulative: int
    final: bool
    fee_ppm: int | None = None  # None: the gateway's fee; a transfer's is 0


@dataclass(frozen=True, slots=True)
class Refund:
    """Close ``task_id``'s escrow, returning what is left. ``recovery``: the core acknowledges a
    failure of this escrow (the worker refused its ops since) and closes it as the disk has it."""

    task_id: str
    recovery: bool = False


@dataclass(frozen=True, slots=True)
class Leaf:
    """A final settlement's receipt-log entry; it is appended only if every op of the escrows it
    records succeeded (``escrows``), and ``token`` names it in the answer."""

    token: int
    entry: bytes
    escrows: tuple[str, ...]


LedgerOp = Hold | Settle | Refund
Op = Hold | Settle | Refund | Leaf


@dataclass(frozen=True, slots=True)
class Committed:
    """The worker's answer for one group commit: what failed (escrow id -> why), the receipt of
    each leaf token (None: logged, but no receipt could be made), movements someone else wrote
    into the ledger file since the last commit (account -> micro-tokens), and up to which
    ``seq`` the core's journals are now on disk."""

    seq: int
    failed: dict[str, str]
    receipts: dict[int, dict | None]
    external: dict[str, int]
