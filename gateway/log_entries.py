"""Settlement leaves, signed tree heads and log receipts: the receipt log's pure part.

Owns: the canonical bytes of a settlement leaf and their checks, signed tree heads (signing,
verification, consistency, :class:`HeadWitness`), log receipts and their offline verification,
and the offline audits of exported leaves (:func:`money_in`, :func:`check_exported_log`). It is
apart from :mod:`gateway.receipt_log` (the SQLite store and its HTTP answers) because clients and
auditors need exactly this part, with no database: everything here is a function of its bytes
and the gateway's key. :mod:`gateway.merkle` does the hashing and the proofs.

Must never: raise from :func:`verify_log_receipt` (malformed means invalid), or accept an
entry, head or receipt in more than one spelling.

**Leaf entry encoding.** A leaf's entry is ``JSON(settlement)`` as ASCII bytes, with
``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)``:
keys sorted at every level, no whitespace, non-ASCII escaped, ints as ints, floats as their
shortest round-trip repr. :func:`decode_entry` accepts only that one spelling. The settlement::

    {"v": 1, "task_id": str, "client": account, "function_hash": str, "input_hash": str,
     "providers": [{"account": account, "result_hash": str,  # this provider's ballot
                    "usage": {str: number}, "prices": {str: number},  # capped usage, its prices
                    "paid_micro": int}, ...],  # what this provider received (0 if out-voted)
     "outcome": str,  # the result hash the vote accepted (or the failure's hash)
     "amount_micro": int, "fee_micro": int,  # charged to the client; kept by the gateway
     "time_ms": int}  # settlement time, Unix milliseconds

with ``amount_micro == fee_micro + sum(paid_micro)`` (the money in a leaf adds up on its own)
and each provider account named once. The leaf of a chunk of a ``map`` (one task that ran the
function on several items) may add ``"items": [hex, ...]``, each item's result hash (or its
failure's hash), in item order; a leaf without it has exactly the fields above, byte for byte.

**Signed tree head.** ``{"size": int, "root": hex, "time": int, "signature": hex}``, ``time`` in
Unix milliseconds. The Ed25519 signature covers ``b"decompute-tree-head-v1\\x00" ||
size (8 bytes, big-endian) || time (8 bytes, big-endian) || root (32 bytes)``: the prefix is domain
separation, so no head signature passes for a receipt or an authentication answer.

**Receipt.** ``{"entry": str (the entry's ASCII text), "index": int, "proof": [hex, ...],
"head": signed tree head}``: JSON- and msgpack-safe, checkable offline with the gateway's key.
An *item receipt* is a chunk's receipt plus ``"item": int``, the item's index in the chunk: it
proves the chunk's leaf, and the leaf's ``items[item]`` names that item's result.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import merkle
from gateway.identity import Identity, verify

ENTRY_VERSION = 1
HEAD_CONTEXT = b"decompute-tree-head-v1\x00"
#: One leaf's entry: a settlement with a few providers is well under 4 KiB; the cap keeps a bug
#: from writing megabytes per task into a table every auditor downloads.
MAX_ENTRY_BYTES = 64 * 1024
#: Item result hashes one chunk's leaf may list (``gateway.schema.MAX_ITEMS``): 512 hashes of 64
#: hex digits keep a leaf far under ``MAX_ENTRY_BYTES``.
MAX_LEAF_ITEMS = 512


class ReceiptLogError(Exception):
    """Base of every error this module raises on purpose."""


class EntryError(ReceiptLogError, ValueError):
    """A settlement entry that is malformed, does not add up, or is not in canonical form."""


class ReceiptInvalid(ReceiptLogError):
    """A receipt that does not verify; ``index`` names its leaf (None if it has none)."""

    def __init__(self, index: object, reason: str) -> None:
        self.index = index if isinstance(index, int) and not isinstance(index, bool) else None
        super().__init__(f"receipt for leaf {self.index}: {reason}")


class ForkDetected(ReceiptLogError):
    """Two signed heads of one gateway that cannot both be true: it rewrote or forked its log."""


class LogCorrupted(ReceiptLogError):
    """The stored log does not match itself; the message names the leaf, node or head."""




# -- leaf entries ------------------------------------------------------------------------------

def _canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def settlement_entry(*, task_id: str, client: str, function_hash: str, input_hash: str,
                     providers: Sequence[Mapping[str, Any]], outcome: str, amount_micro: int,
                     fee_micro: int, time_ms: int, items: Sequence[str] | None = None) -> bytes:
    """The canonical bytes of one final settlement (see the module docstring).

    ``providers`` holds one mapping per provider that ran the task: ``account``,
    ``result_hash``, ``usage``, ``prices``, ``paid_micro``. ``items`` (a chunk's) lists each
    item's result hash (:func:`gateway.chunks.item_hashes`); without it the entry has the
    fields it always had. Raises :class:`EntryError` naming the field when the settlement could
    never verify or does not add up.
    """
    if isinstance(providers, str | bytes) or not all(isinstance(p, Mapping) for p in providers):
        raise EntryError(f"cannot log the settlement of task {task_id!r}: providers must be a"
                         " sequence of mappings (account, result_hash, usage, prices, paid_micro)")
    entry = {
        "v": ENTRY_VERSION, "task_id": task_id, "client": client,
        "function_hash": function_hash, "input_hash": input_hash,
        "providers": [{
            "account": p.get("account"), "result_hash": p.get("result_hash"),
            "usage": _plain_map(p.get("usage"), "usage"),
            "prices": _plain_map(p.get("prices"), "prices"),
            "paid_micro": p.get("paid_micro"),
        } for p in providers],
        "outcome": outcome, "amount_micro": amount_micro, "fee_micro": fee_micro,
        "time_ms": time_ms,
    }
    if items is not None:
        entry["items"] = list(items) if isinstance(items, list | tuple) else items
    problem = _entry_problem(entry)
    if problem:
        raise EntryError(f"cannot log the settlement of task {task_id!r}: {problem}")
    data = _canonical(entry)
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"settlement of task {task_id!r} is {len(data)} bytes, over the"
                         f" {MAX_ENTRY_BYTES}-byte cap of a leaf; shorten its usage or prices")
    return data


def decode_entry(data: bytes | str) -> dict[str, Any]:
    """The settlement in ``data``; :class:`EntryError` unless it is well-formed and canonical."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EntryError(f"entry is not JSON: {exc}") from None
    problem = _entry_problem(entry) if isinstance(entry, dict) else "entry is not a JSON object"
    if problem:
        raise EntryError(problem)
    if _canonical(entry) != raw:
        raise EntryError("entry is not in canonical form (sorted keys, no spaces, ASCII)")
    return entry


_ENTRY_KEYS = frozenset({"v", "task_id", "client", "function_hash", "input_hash", "providers",
                         "outcome", "amount_micro", "fee_micro", "time_ms"})
_PROVIDER_KEYS = frozenset({"account", "result_hash", "usage", "prices", "paid_micro"})


def _entry_problem(entry: Mapping[str, Any]) -> str | None:
    """What makes ``entry`` malformed, or None."""
    if set(entry) - {"items"} != _ENTRY_KEYS:
        return f"entry fields must be exactly {sorted(_ENTRY_KEYS)} (and items, a chunk's)"
    if "items" in entry:
        problem = _items_problem(entry["items"])
        if problem:
            return problem
    if entry["v"] != ENTRY_VERSION or not _is_int(entry["v"]):
        return f"v must be {ENTRY_VERSION}"
    for name in ("task_id", "client", "function_hash", "input_hash", "outcome"):
        if not isinstance(entry[name], str) or not entry[name]:
            return f"{name} must be a non-empty str"
    for name in ("amount_micro", "fee_micro", "time_ms"):
        if not _is_int(entry[name]) or entry[name] < 0:
            return f"{name} must be an int >= 0"
    providers = entry["providers"]
    if not isinstance(providers, list) or not providers:
        return "providers must be a non-empty list"
    for i, p in enumerate(providers):
        problem = _provider_problem(p)
        if problem:
            return f"providers[{i}]: {problem}"
    accounts = [p["account"] for p in providers]
    if len(set(accounts)) != len(accounts):
        return f"providers must be distinct accounts, got {accounts}"
    paid = sum(p["paid_micro"] for p in providers)
    if entry["amount_micro"] != entry["fee_micro"] + paid:
        return (f"amount_micro {entry['amount_micro']} != fee_micro {entry['fee_micro']}"
                f" + paid to providers {paid}")
    return None


def _items_problem(items: object) -> str | None:
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_LEAF_ITEMS:
        return f"items must be a list of 1 to {MAX_LEAF_ITEMS} result hashes"
    for i, h in enumerate(items):
        if not isinstance(h, str) or len(h) != 64 or h.strip("0123456789abcdef"):
            return f"items[{i}] must be a result hash (64 lowercase hex digits)"
    return None


def _provider_problem(p: object) -> str | None:
    if not isinstance(p, dict) or set(p) != _PROVIDER_KEYS:
        return f"fields must be exactly {sorted(_PROVIDER_KEYS)}"
    for name in ("account", "result_hash"):
        if not isinstance(p[name], str) or not p[name]:
            return f"{name} must be a non-empty str"
    for name in ("usage", "prices"):
        if not isinstance(p[name], dict) or not all(
                isinstance(k, str) and _is_number(v) for k, v in p[name].items()):
            return f"{name} must map str to finite numbers"
    if not _is_int(p["paid_micro"]) or p["paid_micro"] < 0:
        return "paid_micro must be an int >= 0"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _plain_map(value: object, name: str) -> dict[str, int | float]:
    """Numbers (numpy scalars included) as plain ints or floats, so they encode one way."""
    if not isinstance(value, Mapping) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value.values()):
        raise EntryError(f"{name} must be a mapping of str to numbers, not {value!r:.80}")
    return {str(k): int(v) if isinstance(v, numbers.Integral) else float(v)
            for k, v in value.items()}


# -- signed tree heads --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TreeHead:
    """The gateway's signed word that its log had ``size`` leaves with ``root`` at ``time_ms``."""

    size: int
    root: bytes
    time_ms: int
    signature: bytes

    def message(self) -> bytes:
        return head_message(self.size, self.root, self.time_ms)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "time": self.time_ms,
                "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: object) -> TreeHead:
        """Parse a head; :class:`ReceiptLogError` on any malformed field (the signature is
        checked by :func:`check_head`, not here)."""
        if not isinstance(value, Mapping) or set(value) != {"size", "root", "time", "signature"}:
            raise ReceiptLogError("a tree head is exactly {size, root, time, signature}")
        size, time_ms = value["size"], value["time"]
        if not _is_int(size) or size < 0 or not _is_int(time_ms) or time_ms < 0:
            raise ReceiptLogError("a tree head's size and time are ints >= 0")
        return cls(size, _unhex(value["root"], "root", 32), time_ms,
                   _unhex(value["signature"], "signature", 64))

    def __str__(self) -> str:
        return f"head (size {self.size}, root {self.root.hex()[:16]}…, time {self.time_ms})"


def head_message(size: int, root: bytes, time_ms: int) -> bytes:
    """The exact bytes a tree head signature covers (see the module docstring)."""
    return HEAD_CONTEXT + size.to_bytes(8, "big") + time_ms.to_bytes(8, "big") + root


def sign_tree_head(identity: Identity, size: int, root: bytes, time_ms: int) -> TreeHead:
    return TreeHead(size, root, time_ms, identity.sign(head_message(size, root, time_ms)))


def check_head(head: TreeHead, gateway_key: bytes) -> None:
    """Raise :class:`ReceiptLogError` unless ``head`` is signed by ``gateway_key``."""
    if not _signed(gateway_key, head.signature, head.message()):
        raise ReceiptLogError(f"{head} is not signed by gateway key {gateway_key.hex()[:16]}…")


@functools.lru_cache(maxsize=1024)
def _signed(key: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification, remembered: the receipts of one batch share one head, and a
    verification (~0.1 ms) would otherwise dominate checking each of them."""
    return verify(key, signature, message)


def check_head_consistency(old: TreeHead, new: TreeHead, proof: Sequence[bytes],
                           gateway_key: bytes) -> None:
    """Both heads signed by ``gateway_key`` and ``new`` extends ``old`` (``proof`` from
    ``/log/consistency?first=old.size&second=new.size``); else :class:`ForkDetected` naming both.

    A client runs this on every newer head against the newest it has seen.
    """
    check_head(old, gateway_key)
    check_head(new, gateway_key)
    if new.size < old.size:
        raise ForkDetected(f"gateway log went back: {new} is smaller than the {old} it signed"
                           " before; keep both heads as evidence and stop trusting this gateway")
    try:
        merkle.verify_consistency(old.size, new.size, old.root, new.root, list(proof))
    except merkle.ProofError as exc:
        raise ForkDetected(f"gateway log fork: {new} does not extend {old} ({exc}); keep both"
                           " heads as evidence and stop trusting this gateway") from None


# -- receipts -----------------------------------------------------------------------------------

def make_log_receipt(entry: bytes, index: int, proof: Sequence[bytes],
                     head: TreeHead) -> dict[str, Any]:
    return {"entry": entry.decode("ascii"), "index": index, "proof": [p.hex() for p in proof],
            "head": head.to_json()}


def check_log_receipt(receipt: object, gateway_key: str | bytes) -> dict[str, Any]:
    """Check a receipt offline: its entry is a canonical settlement, its head is signed by
    ``gateway_key`` (hex or 32 raw bytes), and the entry is leaf ``index`` of that head's tree.

    Returns the decoded settlement; raises :class:`ReceiptInvalid` naming the leaf and the check
    that failed.
    """
    index = receipt.get("index") if isinstance(receipt, Mapping) else None
    if not isinstance(receipt, Mapping) or (
            set(receipt) - {"item"} != {"entry", "index", "proof", "head"}):
        raise ReceiptInvalid(index, "a receipt is exactly {entry, index, proof, head} (and item,"
                                    " an item receipt's)")
    if not _is_int(index) or index < 0:
        raise ReceiptInvalid(index, "index must be an int >= 0")
    try:
        key = bytes.fromhex(gateway_key) if isinstance(gateway_key, str) else bytes(gateway_key)
        entry_text, proof = receipt["entry"], receipt["proof"]
        if not isinstance(entry_text, str) or not isinstance(proof, list):
            raise ReceiptLogError("entry must be a str and proof a list of hex hashes")
        settlement = decode_entry(entry_text)
        head = TreeHead.from_json(receipt["head"])
        check_head(head, key)
        hashes = [_unhex(p, f"proof[{i}]", 32) for i, p in enumerate(proof)]
        merkle.verify_inclusion(merkle.hash_leaf(entry_text.encode("ascii")), index, head.size,
                                hashes, head.root)
    except (ReceiptLogError, merkle.MerkleError, ValueError, TypeError) as exc:
        raise ReceiptInvalid(index, str(exc)) from None
    if "item" in receipt:
        _item_index(receipt, settlement)
    return settlement


def _item_index(receipt: Mapping[str, Any], settlement: Mapping[str, Any]) -> int:
    """An item receipt's index, checked against its leaf's item list (when the leaf has one:
    leaves logged before the gateway listed items prove the chunk, not each item)."""
    item, index = receipt["item"], receipt["index"]
    if not _is_int(item) or not 0 <= item < MAX_LEAF_ITEMS:
        raise ReceiptInvalid(index, f"item must be an int in [0, {MAX_LEAF_ITEMS})")
    items = settlement.get("items")
    if items is not None and item >= len(items):
        raise ReceiptInvalid(index, f"item {item} is not in this chunk of {len(items)} items")
    return item


def check_item_result(receipt: object, gateway_key: str | bytes,
                      result_hash: str) -> dict[str, Any]:
    """Check an item receipt (:func:`check_log_receipt`) and that its leaf names
    ``result_hash`` (:func:`gateway.billing.result_hash` of the item's result buffers, or its
    failure's hash) as the item's outcome. Raises :class:`ReceiptInvalid` saying which check
    failed; a leaf that lists no items cannot vouch for one item's bytes, and says so."""
    settlement = check_log_receipt(receipt, gateway_key)
    index = receipt.get("index") if isinstance(receipt, Mapping) else None
    if not isinstance(receipt, Mapping) or "item" not in receipt:
        raise ReceiptInvalid(index, "not an item receipt (no item index): compare the result's"
                                    " hash with the leaf's outcome instead")
    item = _item_index(receipt, settlement)
    items = settlement.get("items")
    if items is None:
        raise ReceiptInvalid(index, "this chunk's leaf lists no item result hashes (its gateway"
                                    " did not log them): it proves the chunk's settlement, not"
                                    f" item {item}'s bytes")
    if items[item] != result_hash:
        raise ReceiptInvalid(index, f"item {item}'s result hash {result_hash[:16]}... differs"
                                    f" from the logged {items[item][:16]}...")
    return settlement


def verify_log_receipt(receipt: object, gateway_key: str | bytes) -> bool:
    """True only for a receipt that :func:`check_log_receipt` accepts; never raises."""
    try:
        check_log_receipt(receipt, gateway_key)
    except Exception:  # a verifier's promise: malformed input is invalid, never an exception
        return False
    return True


class HeadWitness:
    """What a client remembers of one gateway's log: the newest signed head it has seen.

    Every head the client meets (in a receipt, from ``/log/head``) goes through :meth:`observe`;
    a newer one must come with a consistency proof from the remembered one. A gateway that
    rewrites or forks its history is caught by any client that saw the old head.
    """

    def __init__(self, gateway_key: bytes, newest: TreeHead | None = None) -> None:
        if newest is not None:
            check_head(newest, gateway_key)
        self.gateway_key, self.newest = gateway_key, newest

    def needs_proof(self, head: TreeHead) -> tuple[int, int] | None:
        """The ``(first, second)`` of the consistency proof :meth:`observe` needs with ``head``
        (``/log/consistency?first=..&second=..``), or None when it needs none."""
        if self.newest is None or head.size == self.newest.size:
            return None
        return min(head.size, self.newest.size), max(head.size, self.newest.size)

    def observe(self, head: TreeHead, proof: Sequence[bytes] = ()) -> None:
        """Check ``head`` against the newest seen (an older head must be a prefix of it, a newer
        one must extend it) and remember it if newer; raises :class:`ForkDetected` naming both
        heads when they cannot both be true, :class:`ReceiptLogError` on a bad signature."""
        check_head(head, self.gateway_key)
        newest = self.newest
        if newest is None:
            self.newest = head
        elif head.size > newest.size:
            check_head_consistency(newest, head, proof, self.gateway_key)
            self.newest = head
        elif head.size == newest.size:
            check_head_consistency(newest, head, (), self.gateway_key)
        else:
            check_head_consistency(head, newest, proof, self.gateway_key)


def money_in(entries: Iterable[bytes | str]) -> dict[str, Any]:
    """Re-add the money in settlement leaves: per account what it was charged (``spent``) and
    what it received (``earned``), and the gateway's ``fees``; in micro-tokens.

    Each leaf adds up on its own (:func:`decode_entry` checks it), so ``sum(spent) ==
    sum(earned) + fees_micro``; an auditor compares these with the ledger's balances.
    """
    spent: dict[str, int] = {}
    earned: dict[str, int] = {}
    fees = count = 0
    for count, data in enumerate(entries, 1):
        try:
            settled = decode_entry(data)
        except EntryError as exc:
            raise EntryError(f"leaf {count - 1}: {exc}") from None
        spent[settled["client"]] = spent.get(settled["client"], 0) + settled["amount_micro"]
        for p in settled["providers"]:
            earned[p["account"]] = earned.get(p["account"], 0) + p["paid_micro"]
        fees += settled["fee_micro"]
    return {"leaves": count, "spent": spent, "earned": earned, "fees_micro": fees}


def check_exported_log(entries: Sequence[bytes | str], heads: Iterable[TreeHead],
                       gateway_key: bytes) -> merkle.MerkleTree:
    """Offline audit of an exported log (``/log/entries`` pages and the heads a client saved):
    rebuild the tree and check every head's signature and root. Returns the rebuilt tree (for
    proofs against it); raises :class:`LogCorrupted` naming the head that does not match."""
    tree = merkle.MerkleTree(
        [e.encode("ascii") if isinstance(e, str) else bytes(e) for e in entries])
    for head in heads:
        check_head(head, gateway_key)
        if head.size > tree.size:
            raise LogCorrupted(f"signed {head} covers more leaves than the {tree.size} exported")
        if tree.root(head.size) != head.root:
            raise LogCorrupted(f"signed {head} does not match the exported leaves: the log was"
                               " rewritten or the export is not the log the gateway signed")
    return tree


def _unhex(value: object, name: str, length: int) -> bytes:
    try:
        raw = bytes.fromhex(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ReceiptLogError(f"{name} must be a hex str, got {value!r:.80}") from None
    if len(raw) != length or raw.hex() != value:  # one spelling: lowercase hex, no spaces
        raise ReceiptLogError(f"{name} must be {length} bytes as lowercase hex")
    return raw
