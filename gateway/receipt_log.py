"""The receipt log: every final settlement as a leaf of an append-only RFC 6962 Merkle log.

Owns: the log's SQLite tables (appending leaves, signing heads over them, proofs and receipts
read from the stored tree, the O(n) self-check), and the read-only HTTP answers for
``/log/head``, ``/log/inclusion``, ``/log/consistency`` and ``/log/entries``.
:mod:`gateway.merkle` does the hashing and the proofs.

Must never: sign a tree head over leaves that are not committed, sign a head that is not
consistent with the last head it signed (even if the tables were edited under it), or keep the
log in Python state between calls (the database is the only truth, as in :mod:`gateway.ledger`).

The formats of a leaf entry, a signed tree head and a receipt, and everything that checks them
without a database, live in :mod:`gateway.log_entries`; their names are re-exported here.

The SQLite interface is narrow (:class:`ReceiptLog`; :func:`append_leaves` inside a caller's
transaction) so a PostgreSQL module can replace it method for method.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from gateway import merkle
from gateway.identity import Identity
from gateway.log_entries import ENTRY_VERSION as ENTRY_VERSION
from gateway.log_entries import HEAD_CONTEXT as HEAD_CONTEXT
from gateway.log_entries import MAX_ENTRY_BYTES as MAX_ENTRY_BYTES
from gateway.log_entries import MAX_LEAF_ITEMS as MAX_LEAF_ITEMS
from gateway.log_entries import EntryError as EntryError
from gateway.log_entries import ForkDetected as ForkDetected
from gateway.log_entries import HeadWitness as HeadWitness
from gateway.log_entries import LogCorrupted as LogCorrupted
from gateway.log_entries import ReceiptInvalid as ReceiptInvalid
from gateway.log_entries import ReceiptLogError as ReceiptLogError
from gateway.log_entries import TreeHead as TreeHead
from gateway.log_entries import _is_int
from gateway.log_entries import check_exported_log as check_exported_log
from gateway.log_entries import check_head as check_head
from gateway.log_entries import check_head_consistency as check_head_consistency
from gateway.log_entries import check_item_result as check_item_result
from gateway.log_entries import check_log_receipt as check_log_receipt
from gateway.log_entries import decode_entry as decode_entry
from gateway.log_entries import head_message as head_message
from gateway.log_entries import make_log_receipt as make_log_receipt
from gateway.log_entries import money_in as money_in
from gateway.log_entries import settlement_entry as settlement_entry
from gateway.log_entries import sign_tree_head as sign_tree_head
from gateway.log_entries import verify_log_receipt as verify_log_receipt

log = logging.getLogger(__name__)

#: ``/log/entries`` answers at most this many leaves per request (at most ~64 MiB, usually
#: ~1 MiB); a client pages through the rest, as with CT's get-entries.
MAX_ENTRIES_PER_READ = 1000


class LogRequestError(ReceiptLogError):
    """A ``/log/...`` request that cannot be answered; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


# -- the log in SQLite --------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_leaves (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log_nodes (  -- every complete subtree: (level, idx) as in gateway.merkle
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_heads (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, time_ms INTEGER NOT NULL,
    signature BLOB NOT NULL);
"""


def create_tables(db: sqlite3.Connection) -> None:
    """Create the log's tables in ``db`` (idempotent): beside the ledger's, in its file."""
    db.executescript(_SCHEMA)


def _size(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_leaves").fetchone()[0]


def _reader(db: sqlite3.Connection) -> merkle.NodeReader:
    def read(level: int, index: int) -> bytes:
        row = db.execute("SELECT hash FROM log_nodes WHERE level = ? AND idx = ?",
                         (level, index)).fetchone()
        if row is None:
            raise LogCorrupted(f"the log has no node ({level}, {index}): its tables were edited"
                               " or truncated; run ReceiptLog.check() to find the damage")
        return bytes(row[0])
    return read


def _batch_reader(db: sqlite3.Connection, start: int, end: int, size: int) -> merkle.NodeReader:
    """A reader for the proofs of leaves ``[start, end)``: their neighbourhood at every level in
    one query per level, the rest read once and remembered (proofs of a batch share most nodes).
    """
    cache: dict[tuple[int, int], bytes] = {}
    for level in range(size.bit_length()):
        rows = db.execute("SELECT idx, hash FROM log_nodes WHERE level = ? AND idx BETWEEN ? AND ?",
                          (level, max((start >> level) - 1, 0), ((end - 1) >> level) + 1))
        cache.update(((level, idx), bytes(h)) for idx, h in rows)
    point = _reader(db)

    def read(level: int, index: int) -> bytes:
        h = cache.get((level, index))
        if h is None:
            h = cache[level, index] = point(level, index)
        return h
    return read


def append_leaves(db: sqlite3.Connection, entries: Sequence[bytes]) -> int:
    """Append ``entries`` as the next leaves, inside the caller's open write transaction (so a
    settlement and its leaf commit together); returns the first new leaf's index.

    O(log n) reads plus amortised O(1) writes per leaf.
    """
    for i, entry in enumerate(entries):
        if not isinstance(entry, bytes) or not entry or len(entry) > MAX_ENTRY_BYTES:
            raise EntryError(f"entries[{i}] must be 1 to {MAX_ENTRY_BYTES} bytes"
                             " (from settlement_entry)")
    first = _size(db)
    border = merkle.CompactRange.load(_reader(db), first)
    nodes = [node for entry in entries for node in border.append(merkle.hash_leaf(entry))]
    db.executemany("INSERT INTO log_leaves (idx, entry) VALUES (?, ?)",
                   [(first + i, entry) for i, entry in enumerate(entries)])
    db.executemany("INSERT INTO log_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes)
    return first


def _entry_bytes(value: object) -> bytes:
    """A stored entry's bytes, even if a hand edit turned the BLOB into TEXT (its hash then
    names the leaf as changed, instead of the read failing)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)  # type: ignore[arg-type]


def _row_head(row: tuple | None) -> TreeHead | None:
    return None if row is None else TreeHead(row[0], bytes(row[1]), row[2], bytes(row[3]))


def _latest_head(db: sqlite3.Connection) -> TreeHead | None:
    return _row_head(db.execute("SELECT size, root, time_ms, signature FROM log_heads"
                                " ORDER BY size DESC LIMIT 1").fetchone())


class ReceiptLog:
    """The log on one SQLite file; thread-safe: one connection, one lock, one tx per call.

    Durability as in :mod:`gateway.ledger` (WAL, ``synchronous=NORMAL``): a committed batch
    survives a SIGKILL of the gateway, an uncommitted one vanishes whole. Readers in other
    processes (or another ``ReceiptLog`` on the same file) see committed batches only.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._lock = threading.Lock()
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        create_tables(db)
        self._db: sqlite3.Connection | None = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ReceiptLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction: a write takes the lock up front (BEGIN IMMEDIATE); a read sees one
        consistent snapshot, so a proof never mixes two sizes."""
        with self._lock:
            db = self._db
            if db is None:
                raise ReceiptLogError(f"receipt log {self.path} is closed")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:  # including a failed COMMIT: never leave a transaction open
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # -- writing ---------------------------------------------------------------------------------

    def append(self, entries: Sequence[bytes]) -> int:
        """Append a batch in one transaction; returns the index of its first leaf."""
        batch = list(entries)
        with self._tx(write=True) as db:
            first = append_leaves(db, batch)
        log.debug("receipt log: appended leaves [%d, %d)", first, first + len(batch))
        return first

    def sign_head(self, identity: Identity, *, now_ms: int | None = None) -> TreeHead:
        """Sign and store a head over every committed leaf (the latest head again if no leaf
        came since). Refuses, with :class:`LogCorrupted`, to sign a head that does not extend
        the last one: the gateway never forks its own log, even over edited tables."""
        with self._tx(write=True) as db:
            size, last = _size(db), _latest_head(db)
            if last is not None and last.size == size:
                return last
            read = _reader(db)
            root = merkle.root(read, size)
            if last is not None:
                self._check_extends(read, last, size, root)
            wall = int(time.time() * 1000) if now_ms is None else now_ms
            head = sign_tree_head(identity, size, root, max(wall, last.time_ms if last else 0))
            db.execute("INSERT INTO log_heads (size, root, time_ms, signature) VALUES (?, ?, ?, ?)",
                       (head.size, head.root, head.time_ms, head.signature))
        log.debug("receipt log: signed %s", head)
        return head

    @staticmethod
    def _check_extends(read: merkle.NodeReader, last: TreeHead, size: int, root: bytes) -> None:
        try:
            if size < last.size:
                raise merkle.ProofError(f"the log has {size} leaves, fewer than signed")
            merkle.verify_consistency(last.size, size, last.root, root,
                                      merkle.consistency_proof(read, last.size, size))
        except merkle.MerkleError as exc:
            raise LogCorrupted(f"refusing to sign: the stored log does not extend the last"
                               f" signed {last} ({exc}); run ReceiptLog.check() to find the"
                               " damage") from None

    # -- reading ---------------------------------------------------------------------------------

    def size(self) -> int:
        """How many leaves are committed (signed or not yet)."""
        with self._tx() as db:
            return _size(db)

    def root(self, size: int | None = None) -> bytes:
        with self._tx() as db:
            return merkle.root(_reader(db), self._bounded(db, size))

    def head(self) -> TreeHead | None:
        """The latest signed tree head, or None before the first :meth:`sign_head`."""
        with self._tx() as db:
            return _latest_head(db)

    def heads(self) -> list[TreeHead]:
        """Every signed head, smallest first (the gateway's whole signed history)."""
        with self._tx() as db:
            rows = db.execute("SELECT size, root, time_ms, signature FROM log_heads"
                              " ORDER BY size").fetchall()
        return [_row_head(row) for row in rows]  # type: ignore[misc]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """The inclusion proof of leaf ``index`` in the tree of ``size`` leaves."""
        with self._tx() as db:
            return merkle.inclusion_proof(_reader(db), index, self._bounded(db, size))

    def consistency(self, first: int, second: int) -> list[bytes]:
        """The proof that the tree of ``first`` leaves is a prefix of that of ``second``."""
        with self._tx() as db:
            return merkle.consistency_proof(_reader(db), first, self._bounded(db, second))

    def entries(self, start: int, end: int) -> list[bytes]:
        """Leaves ``[start, end)`` (at most :data:`MAX_ENTRIES_PER_READ`, clipped to the log)."""
        with self._tx() as db:
            n = _size(db)
            if not (_is_int(start) and _is_int(end) and 0 <= start <= end and start <= n):
                raise merkle.MerkleError(f"leaf range [{start!r}, {end!r}) is not within the"
                                         f" log's {n} leaves")
            end = min(end, n, start + MAX_ENTRIES_PER_READ)
            rows = db.execute("SELECT idx, entry FROM log_leaves WHERE idx >= ? AND idx < ?"
                              " ORDER BY idx", (start, end)).fetchall()
        if [idx for idx, _ in rows] != list(range(start, end)):
            missing = sorted(set(range(start, end)) - {idx for idx, _ in rows})
            raise LogCorrupted(f"leaf {missing[0]} is missing from the log's table")
        return [_entry_bytes(entry) for _, entry in rows]

    def receipts(self, start: int, end: int, head: TreeHead | None = None) -> list[dict]:
        """Receipts of leaves ``[start, end)`` under ``head`` (default: the latest), in one
        snapshot: what billing hands out after a batch's :meth:`sign_head`."""
        with self._tx() as db:
            head = head or _latest_head(db)
            if head is None or end > head.size:
                raise ReceiptLogError(f"leaves up to {end} are not covered by a signed head yet"
                                      f" ({head or 'none signed'}); call sign_head first")
            read = _batch_reader(db, start, end, head.size)
            rows = db.execute("SELECT idx, entry FROM log_leaves WHERE idx >= ? AND idx < ?"
                              " ORDER BY idx", (start, end)).fetchall()
            return [make_log_receipt(_entry_bytes(entry), idx,
                                     merkle.inclusion_proof(read, idx, head.size), head)
                    for idx, entry in rows]

    def receipt(self, index: int, head: TreeHead | None = None) -> dict:
        """The receipt of leaf ``index`` under ``head`` (default: the latest signed head)."""
        found = self.receipts(index, index + 1, head)
        if not found:
            raise LogCorrupted(f"leaf {index} is missing from the log's table")
        return found[0]

    @staticmethod
    def _bounded(db: sqlite3.Connection, size: int | None) -> int:
        n = _size(db)
        if size is None:
            return n
        if not _is_int(size) or not 0 <= size <= n:
            raise merkle.MerkleError(f"size {size!r} is not within the log's 0..{n} leaves")
        return size

    # -- auditing --------------------------------------------------------------------------------

    def check(self, gateway_key: bytes) -> None:
        """Re-derive the whole log from its entries and compare with every stored node and
        signed head: :class:`LogCorrupted` names the first leaf, node or head that differs.

        O(n): for audits and tests, never on the hot path.
        """
        with self._tx() as db:
            stored = {(level, idx): bytes(h) for level, idx, h in
                      db.execute("SELECT level, idx, hash FROM log_nodes")}
            heads = {size: _row_head((size, root, t, sig)) for size, root, t, sig in
                     db.execute("SELECT size, root, time_ms, signature FROM log_heads")}
            rebuilt = merkle.CompactRange()
            roots = {0: rebuilt.root()}
            for idx, entry in db.execute("SELECT idx, entry FROM log_leaves ORDER BY idx"):
                if idx != rebuilt.size:
                    raise LogCorrupted(f"leaf {rebuilt.size} is missing from the log's table")
                for level, node_idx, h in rebuilt.append(merkle.hash_leaf(_entry_bytes(entry))):
                    if stored.get((level, node_idx)) != h:
                        raise LogCorrupted(_node_mismatch(level, node_idx))
                if rebuilt.size in heads:
                    roots[rebuilt.size] = rebuilt.root()
        for size, head in sorted(heads.items()):
            assert head is not None
            check_head(head, gateway_key)
            if roots.get(size) != head.root:
                raise LogCorrupted(f"signed {head} does not match the log's leaves"
                                   f" ({rebuilt.size} stored): the log was rewritten")


def _node_mismatch(level: int, index: int) -> str:
    if level == 0:
        return f"leaf {index}: its entry does not match the hash the log committed to"
    return (f"leaves [{index << level}, {(index + 1) << level}): their entries do not match the"
            f" node ({level}, {index}) the log committed to")


# -- HTTP: read-only answers for anyone ----------------------------------------------------------

def _int_param(query: Mapping[str, str], name: str) -> int:
    value = query.get(name)
    if value is None or not value.isdigit() or len(value) > 18:
        raise LogRequestError(f"query parameter {name} must be an integer >= 0, got {value!r}")
    return int(value)


def handle_head(log_: ReceiptLog, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /log/head``: the latest signed tree head."""
    head = log_.head()
    if head is None:
        raise LogRequestError("this gateway has signed no tree head yet: no task has settled",
                              status=404)
    return head.to_json()


def handle_inclusion(log_: ReceiptLog, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /log/inclusion?index=I&size=N``: leaf I's inclusion proof in the tree of N."""
    index, size = _int_param(query, "index"), _int_param(query, "size")
    return {"index": index, "size": size, "proof": [p.hex() for p in log_.inclusion(index, size)]}


def handle_consistency(log_: ReceiptLog, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /log/consistency?first=M&second=N``: the tree of M is a prefix of the tree of N."""
    first, second = _int_param(query, "first"), _int_param(query, "second")
    return {"first": first, "second": second,
            "proof": [p.hex() for p in log_.consistency(first, second)]}


def handle_entries(log_: ReceiptLog, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /log/entries?start=A&end=B``: leaves [A, B) (end exclusive), at most
    :data:`MAX_ENTRIES_PER_READ`; ``end`` in the answer says where this page stopped."""
    start, end = _int_param(query, "start"), _int_param(query, "end")
    entries = log_.entries(start, end)
    return {"start": start, "end": start + len(entries),
            "entries": [e.decode("ascii", "backslashreplace") for e in entries]}


LOG_ROUTES: dict[str, Callable[[ReceiptLog, Mapping[str, str]], dict[str, Any]]] = {
    "/log/head": handle_head,
    "/log/inclusion": handle_inclusion,
    "/log/consistency": handle_consistency,
    "/log/entries": handle_entries,
}


def log_http(log_: ReceiptLog, target: str) -> tuple[int, dict[str, Any]] | None:
    """Answer a request target (``path?query``) under ``/log/``: ``(status, JSON-able body)``,
    or None when the path is not the log's. Errors come back as ``{"error": message}``."""
    path, _, qs = target.partition("?")
    handler = LOG_ROUTES.get(path)
    if handler is None:
        return None
    query = {k: v[-1] for k, v in parse_qs(qs, keep_blank_values=True).items()}
    try:
        return 200, handler(log_, query)
    except LogRequestError as exc:
        return exc.status, {"error": str(exc)}
    except merkle.MerkleError as exc:
        return 400, {"error": str(exc)}
    except LogCorrupted as exc:  # the stored log is damaged: say where, never a bare 500
        return 500, {"error": str(exc)}
