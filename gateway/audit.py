"""``decompute-audit``: check a file of receipts against a gateway's public receipt log.

Nobody has to trust the gateway's word on what a task cost: with its public key, anyone can check

- every receipt: its signed tree head, its inclusion proof, its entry (a settlement that adds up);
- the log itself: every leaf (``/log/entries``, or an exported ``LOG.jsonl``) rebuilds to the root
  of every signed head met (the receipts', the gateway's latest, a head saved earlier), so a leaf
  changed, deleted or forked away after it was signed is caught, and named;
- consistency with a head saved before (``--head FILE``): the log still extends it;
- the money: each leaf's amount is its providers' pay plus the fee; totals per account.

Usage::

    decompute-audit RECEIPTS.jsonl --gateway http://HOST:PORT [--head HEAD.json] [--save-head F]
    decompute-audit RECEIPTS.jsonl --gateway-key HEX --log LOG.jsonl [--head HEAD.json]
    decompute-audit RECEIPTS.jsonl --gateway URL --ledger DB   # the operator's, with the database
    decompute-audit export (--gateway URL | --db FILE) -o LOG.jsonl

``RECEIPTS.jsonl`` is what ``client.save_receipts(path)`` writes. ``LOG.jsonl`` holds one JSON
object per line: ``{"index": I, "entry": TEXT}`` per leaf and ``{"head": SIGNED_HEAD}`` per head.
Exit status 0 when everything holds, 1 naming each bad receipt, leaf or head, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway import merkle
from gateway.ledger import Ledger, LedgerError, to_tokens
from gateway.receipt_log import (
    MAX_ENTRIES_PER_READ,
    EntryError,
    ReceiptLog,
    ReceiptLogError,
    TreeHead,
    check_head,
    check_head_consistency,
    check_log_receipt,
    decode_entry,
    money_in,
)

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 30.0


class AuditError(Exception):
    """The audit could not even start (unreadable file, unreachable gateway): exit status 2."""


@dataclass
class Log:
    """A gateway's log as the auditor got it: its leaves and the signed heads it came with."""

    key: bytes
    entries: list[bytes]
    heads: list[TreeHead] = field(default_factory=list)
    source: str = ""


# -- getting the log ----------------------------------------------------------------------------

def http_base(url: str) -> str:
    """``ws://h:p`` or ``http://h:p/...`` -> ``http://h:p`` (the gateway's HTTP root)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def get_json(url: str) -> Any:
    """GET ``url`` as JSON; an HTTP error's ``{"error": ...}`` body becomes the message."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise ReceiptLogError(f"GET {url} failed: HTTP {exc.code} {detail}".strip()) from None
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read {url}: {exc}; is the gateway running there?") from None


def gateway_log(url: str) -> Log:
    """The whole log from a gateway: its key (``/health``), latest head, every leaf in pages."""
    base = http_base(url)
    key = bytes.fromhex(get_json(f"{base}/health")["gateway_key"])
    head = TreeHead.from_json(get_json(f"{base}/log/head"))
    entries: list[bytes] = []
    while len(entries) < head.size:
        end = min(head.size, len(entries) + MAX_ENTRIES_PER_READ)
        page = get_json(f"{base}/log/entries?start={len(entries)}&end={end}")
        if not page["entries"]:
            raise ReceiptLogError(f"gateway served no leaf at {len(entries)} of {head.size}")
        entries += [e.encode("ascii") for e in page["entries"]]
    return Log(key, entries, [head], source=base)


def file_log(path: str | Path, key: bytes) -> Log:
    """An exported ``LOG.jsonl`` (see the module docstring)."""
    entries: dict[int, bytes] = {}
    heads: list[TreeHead] = []
    for n, line in enumerate(_lines(path), 1):
        if "head" in line:
            heads.append(TreeHead.from_json(line["head"]))
        elif isinstance(line.get("index"), int) and isinstance(line.get("entry"), str):
            entries[line["index"]] = line["entry"].encode("ascii")
        else:
            raise AuditError(f"{path}:{n}: expected {{index, entry}} or {{head}}")
    missing = sorted(set(range(max(entries, default=-1) + 1)) - set(entries))
    if missing:
        raise ReceiptLogError(f"leaf {missing[0]} is missing from the exported log {path}")
    return Log(key, [entries[i] for i in range(len(entries))], heads, source=str(path))


def export(out: Path, *, url: str | None = None, db: str | None = None) -> int:
    """Write a log as ``LOG.jsonl`` from a gateway or its database file; returns its leaves."""
    if db is not None:
        with ReceiptLog(db) as rl:
            heads, size = rl.heads(), rl.size()
            entries = [e for start in range(0, size, MAX_ENTRIES_PER_READ)
                       for e in rl.entries(start, start + MAX_ENTRIES_PER_READ)]
    else:
        got = gateway_log(url or "")
        heads, entries = got.heads, got.entries
    with open(out, "w", encoding="utf-8") as f:
        for i, entry in enumerate(entries):
            f.write(json.dumps({"index": i, "entry": entry.decode("ascii")}) + "\n")
        for head in heads:
            f.write(json.dumps({"head": head.to_json()}) + "\n")
    return len(entries)


def _lines(path: str | Path) -> Iterable[dict]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise AuditError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(value, dict):
                raise AuditError(f"{path}:{n}: expected a JSON object")
            yield value


# -- the checks ---------------------------------------------------------------------------------

def check_receipts(receipts: list[dict], the_log: Log) -> list[str]:
    """Each receipt verifies on its own and its leaf is the log's leaf at its index."""
    problems = []
    for n, receipt in enumerate(receipts, 1):
        try:
            check_log_receipt(receipt, the_log.key)
        except ReceiptLogError as exc:
            problems.append(f"receipt {n}: {exc}")
            continue
        index = receipt["index"]
        if index >= len(the_log.entries):
            problems.append(f"receipt {n}: leaf {index} is not in the log of"
                            f" {len(the_log.entries)} leaves ({the_log.source})")
        elif the_log.entries[index] != receipt["entry"].encode("ascii"):
            problems.append(f"leaf {index}: the log's entry differs from receipt {n}'s: the log"
                            f" was rewritten after it was signed")
    return problems


def check_heads(the_log: Log, heads: Iterable[TreeHead]) -> list[str]:
    """Every signed head is of this gateway and its root is the rebuilt log's at its size."""
    tree = merkle.MerkleTree(the_log.entries)
    problems, seen = [], set()
    for head in heads:
        if (head.size, head.root) in seen:
            continue
        seen.add((head.size, head.root))
        try:
            check_head(head, the_log.key)
        except ReceiptLogError as exc:
            problems.append(str(exc))
            continue
        if head.size > tree.size:
            problems.append(f"signed {head} covers more leaves than the {tree.size} in the log"
                            f" ({the_log.source}): leaves were deleted or the log went back")
        elif tree.root(head.size) != head.root:
            problems.append(f"signed {head} does not match the log's first {head.size} leaves"
                            f" ({the_log.source}): the log was rewritten or forked")
    return problems


def check_saved_head(saved: TreeHead, the_log: Log, base: str | None) -> list[str]:
    """The log still extends the head saved earlier: with the gateway's own consistency proof
    when one is at hand, and against the rebuilt leaves always."""
    latest = max(the_log.heads, key=lambda h: h.size, default=None)
    problems = []
    if base is not None and latest is not None:
        first, second = sorted((saved.size, latest.size))
        older, newer = (saved, latest) if saved.size <= latest.size else (latest, saved)
        try:
            body = get_json(f"{base}/log/consistency?first={first}&second={second}")
            proof = [bytes.fromhex(h) for h in body["proof"]]
            check_head_consistency(older, newer, proof, the_log.key)
        except ReceiptLogError as exc:
            problems.append(f"saved {saved} vs the gateway's latest {latest}: {exc}")
    problems += [f"saved head: {p}" for p in check_heads(the_log, [saved])]
    return problems


def check_money(receipts: list[dict], the_log: Log) -> tuple[list[str], dict[str, Any]]:
    """Re-add the money in every leaf of the log (each leaf: amount = pay + fee)."""
    try:
        totals = money_in(the_log.entries)
    except EntryError as exc:
        return [str(exc)], {}
    spent, earned = sum(totals["spent"].values()), sum(totals["earned"].values())
    problems = []
    if spent != earned + totals["fees_micro"]:
        problems.append(f"the log does not add up: {spent} spent != {earned} earned +"
                        f" {totals['fees_micro']} fees (micro-tokens)")
    return problems, totals


def check_ledger(path: str | Path, the_log: Log) -> list[str]:
    """The operator's audit (it needs the gateway's database): the stored log matches its own
    leaves (:meth:`ReceiptLog.check`), the ledger is conserved, and each one-provider leaf is
    exactly its escrow's final settlement. (A vote's leaf sums several replicas' escrows, whose
    ids it does not name; the ledger's conservation still covers them.)"""
    if not Path(path).exists():
        raise AuditError(f"no database at {path}; pass the gateway's --db FILE")
    problems = []
    with ReceiptLog(path) as rl:
        try:
            rl.check(the_log.key)
        except ReceiptLogError as exc:
            problems.append(f"{path}: {exc}")
    settled = {}
    for i, entry in enumerate(the_log.entries):
        with contextlib.suppress(EntryError):  # a malformed leaf is reported by check_money
            leaf = decode_entry(entry)
            if len(leaf["providers"]) == 1:
                settled[i] = leaf
    with Ledger(path) as ledger:
        try:
            ledger.check()
        except LedgerError as exc:
            problems.append(f"{path}: the ledger does not add up: {exc}")
        charged = ledger.charged_of([leaf["task_id"] for leaf in settled.values()])
    for i, leaf in settled.items():
        want, got = (leaf["amount_micro"], leaf["fee_micro"]), charged.get(leaf["task_id"])
        if got != want:
            problems.append(f"leaf {i}: task {leaf['task_id']} settled (amount, fee) {want} in"
                            f" the log but {got} in the ledger {path}")
    return problems


def audit(receipts: list[dict], the_log: Log, *, saved: TreeHead | None = None,
          base: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """Every check; returns the problems found (empty: all holds) and the money totals."""
    problems = check_receipts(receipts, the_log)
    heads = [*the_log.heads]
    for receipt in receipts:
        with contextlib.suppress(ReceiptLogError):  # a malformed one: check_receipts says so
            heads.append(TreeHead.from_json(receipt.get("head")))
    problems += check_heads(the_log, heads)
    if saved is not None:
        problems += check_saved_head(saved, the_log, base)
    money_problems, totals = check_money(receipts, the_log)
    return problems + money_problems, totals


# -- the command --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="decompute-audit",
        description="Verify receipts (client.save_receipts) against a gateway's receipt log.")
    ap.add_argument("receipts", help="RECEIPTS.jsonl, as client.save_receipts(path) writes it")
    ap.add_argument("--gateway", help="the gateway's URL (ws:// or http://HOST:PORT)")
    ap.add_argument("--gateway-key", help="the gateway's public key (hex), for --log")
    ap.add_argument("--log", help="an exported LOG.jsonl (decompute-audit export), offline")
    ap.add_argument("--head", help="a signed head saved earlier (JSON) the log must extend")
    ap.add_argument("--save-head", help="write the latest signed head here (for --head later)")
    ap.add_argument("--ledger", help="the operator's check: the gateway's database (--db) must"
                    " hold exactly the log's leaves and settlements")
    return ap


def _export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="decompute-audit export",
                                 description="Write a gateway's receipt log as LOG.jsonl.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gateway", help="the gateway's URL")
    src.add_argument("--db", help="the gateway's database file (--db of decompute-gateway)")
    ap.add_argument("-o", "--output", required=True, help="where to write LOG.jsonl")
    args = ap.parse_args(argv)
    n = export(Path(args.output), url=args.gateway, db=args.db)
    print(f"exported {n} leaves to {args.output}")
    return 0


def _load_log(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Log:
    if args.gateway:
        return gateway_log(args.gateway)
    if not (args.gateway_key and args.log):
        ap.error("pass --gateway URL, or --gateway-key HEX with --log LOG.jsonl")
    try:
        key = bytes.fromhex(args.gateway_key)
    except ValueError:
        ap.error("--gateway-key must be the gateway's public key in hex (/health's gateway_key)")
    return file_log(args.log, key)


def _report(totals: dict[str, Any], n_receipts: int) -> None:
    print(f"ok: {n_receipts} receipts, {totals.get('leaves', 0)} leaves, fees"
          f" {to_tokens(totals.get('fees_micro', 0)):g} tokens")
    for account, micro in sorted(totals.get("spent", {}).items()):
        print(f"  {account} spent  {to_tokens(micro):g}")
    for account, micro in sorted(totals.get("earned", {}).items()):
        print(f"  {account} earned {to_tokens(micro):g}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:
            return _export_main(argv[1:])
        ap = _parser()
        args = ap.parse_args(argv)
        receipts = list(_lines(args.receipts))
        the_log = _load_log(args, ap)
        saved = (TreeHead.from_json(json.loads(Path(args.head).read_text()))
                 if args.head else None)
        problems, totals = audit(receipts, the_log, saved=saved,
                                 base=http_base(args.gateway) if args.gateway else None)
        if args.ledger:
            problems += check_ledger(args.ledger, the_log)
    except AuditError as exc:
        print(f"decompute-audit: {exc}", file=sys.stderr)
        return 2
    except ReceiptLogError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        return 1
    if args.save_head and the_log.heads:
        latest = max(the_log.heads, key=lambda h: h.size)
        Path(args.save_head).write_text(json.dumps(latest.to_json()) + "\n")
    _report(totals, len(receipts))
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
