"""The receipts a client holds and its witness of the gateway's receipt log.

Every receipt that arrives is kept (oldest first) and its signed tree head is checked against the
newest head this client has seen: a newer head must come with a consistency proof, fetched from
the gateway's ``/log/consistency`` over HTTP on a background thread (never the user's, never the
client's event loop), for the newest head met at most every ``MIN_CHECK_INTERVAL`` s; the heads
passed over are checked when the receipts are taken out (``client.receipts()``,
``save_receipts``, ``check_log``). A gateway that rewrote or forked its log is caught: the
:class:`ForkDetected` naming both heads is kept and raised by :meth:`ReceiptBook.check`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.receipt_log import ForkDetected, HeadWitness, ReceiptLogError, TreeHead

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 10.0
#: The background check fetches at most one consistency proof this often (seconds): a map
#: settles in many batches, and a proof per batch would cost the user's work CPU and the
#: gateway's loop (measured: at 0.1 s, +0.5 ms on a trivial task's round trip).
MIN_CHECK_INTERVAL = 1.0


def http_base(address: str) -> str:
    """The gateway's HTTP root for its websocket address (``ws://h:p`` -> ``http://h:p``)."""
    parts = urlsplit(address)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def fetch_json(url: str, timeout: float = HTTP_TIMEOUT) -> Any:
    """GET ``url`` as JSON (the gateway's ``/log/...`` answers)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http/https)
        return json.load(response)


def consistency_proof(base: str, first: int, second: int) -> list[bytes]:
    body = fetch_json(f"{base}/log/consistency?first={first}&second={second}")
    return [bytes.fromhex(h) for h in body["proof"]]


class ReceiptBook:
    """One client's receipts and its :class:`HeadWitness` of the gateway that issued them."""

    def __init__(self, gateway_key: str, address: str) -> None:
        self.base = http_base(address)
        self.witness = HeadWitness(bytes.fromhex(gateway_key))
        self.error: ReceiptLogError | None = None
        self._receipts: list[dict] = []
        self._lock = threading.Lock()
        self._witnessing = threading.Lock()  # one head checked at a time (background or caller)
        self._unchecked: dict[tuple, dict] = {}  # heads met, not yet checked
        self._checked: set[tuple] = set()
        self._draining = False
        self._closed = False
        self._last_check = 0.0
        self._checks = cf.ThreadPoolExecutor(1, thread_name_prefix="decompute-log-witness")

    def add(self, receipt: dict) -> None:
        """Keep ``receipt``; its head is checked in the background (see :meth:`_drain`)."""
        with self._lock:
            self._receipts.append(receipt)
            head = receipt.get("head") if isinstance(receipt, dict) else None
            if not isinstance(head, dict) or "entry" not in receipt:
                return  # an old-format receipt carries no head
            seen = (head.get("size"), head.get("root"))
            if seen in self._checked or seen in self._unchecked:
                return
            self._unchecked[seen] = head
            if self._draining:
                return
            self._draining = True
        with contextlib.suppress(RuntimeError):  # closed: no more checks
            self._checks.submit(self._drain)

    def _drain(self) -> None:
        """Check the NEWEST unchecked head against the newest seen, at most every
        :data:`MIN_CHECK_INTERVAL` s: one proof fetched however many heads a busy map brings.
        The heads it passed over are checked by :meth:`check` (``client.receipts()``)."""
        wait = self._last_check + MIN_CHECK_INTERVAL - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # a rate limit on a background thread, not a synchronisation
        with self._lock:
            self._draining = False
            if not self._unchecked or self._closed:
                return
            newest = max(self._unchecked, key=lambda seen: seen[0])
            head = self._unchecked.pop(newest)
        self._last_check = time.monotonic()
        self._observe(head)

    def observe(self, head: dict | TreeHead) -> None:
        """Check ``head`` against the newest seen, now, on the caller's thread; raises and
        records :class:`ForkDetected` naming both heads when they cannot both be true."""
        parsed = head if isinstance(head, TreeHead) else TreeHead.from_json(head)
        with self._witnessing:  # the proof fetched must be for the newest head it is checked at
            span = self.witness.needs_proof(parsed)
            proof = consistency_proof(self.base, *span) if span else []
            try:
                self.witness.observe(parsed, proof)
            except ReceiptLogError as exc:
                self.error = self.error or exc
                log.error("decompute receipt log: %s", exc)
                raise

    def _observe(self, head: dict) -> None:
        with self._lock:
            self._checked.add((head.get("size"), head.get("root")))
        try:
            self.observe(head)
        except ReceiptLogError:
            pass  # recorded in self.error
        except Exception as exc:  # unreachable gateway: the next head is checked instead
            log.warning("decompute receipt log: could not check %s: %r", head.get("size"), exc)

    def check(self, timeout: float = 30.0) -> None:
        """Check every head met so far (the background passed over some); raise the fork (or
        bad head) found, if any."""
        with contextlib.suppress(RuntimeError):  # closed: the checks already ran or were dropped
            self._checks.submit(lambda: None).result(timeout)
        with self._lock:
            heads, self._unchecked = list(self._unchecked.values()), {}
        for head in sorted(heads, key=lambda h: h.get("size", 0)):
            self._observe(head)
        if self.error is not None:
            raise self.error

    def receipts(self) -> list[dict]:
        with self._lock:
            return list(self._receipts)

    def save(self, path: str | Path) -> int:
        """Write every receipt as JSON lines, oldest first; returns how many."""
        held = self.receipts()
        with open(path, "w", encoding="utf-8") as out:
            for receipt in held:
                out.write(json.dumps(dict(receipt), separators=(",", ":")) + "\n")
        return len(held)

    def close(self) -> None:
        """Stop checking in the background (the client closed); receipts stay readable."""
        self._closed = True
        self._checks.shutdown(wait=False, cancel_futures=True)


__all__ = ["ForkDetected", "ReceiptBook", "http_base"]
