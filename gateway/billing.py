"""Billing: metered usage -> prices -> escrow movements -> receipt-log leaves.

The hub calls this; the core's books (:mod:`gateway.accounts`) decide at once, in memory, and
the accounting worker (:mod:`gateway.accounting_worker`) records their journal in
:mod:`gateway.ledger` and the receipt log in group commits, off the event loop. Escrow is held
at submit (``budget``, else ``max_price`` x cpus x ``timeout``, else the gateway's default
escrow), providers' CUMULATIVE usage
is settled as it arrives (idempotent, so a repeated heartbeat moves nothing), and the final
settlement refunds the leftover and yields the receipt. A task whose charge reaches its escrow is
stopped: the client is never charged more than it reserved.

The gateway believes only what it can check: reported usage is capped (:func:`cap_usage`) by what
the gateway itself observed, the wall time since it sent the assignment times the resources the
task was granted, before anything is priced, and receipts carry the capped figures. A task that
holds no escrow (it may only land on free providers) writes nothing to the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.accounts import Accounts
from gateway.identity import Identity
from gateway.journal import Leaf
from gateway.ledger import MAX_MICRO, Ledger, LedgerError, to_micro, to_tokens
from gateway.protocol import ProviderAd, Result, TaskSpec
from gateway.receipt_log import ReceiptLog, settlement_entry

log = logging.getLogger(__name__)


#: The billing interval: a priced provider takes a task only if its escrow covers this many
#: seconds of the task's granted resources at the provider's prices (a budget too small to pay for
#: one second of work would be free compute). Providers report usage twice a second.
MIN_BILLING_SECONDS = 1.0

#: The usage figures the gateway keeps (and signs); anything else a provider reports is dropped.
USAGE_KEYS = ("cpu_seconds", "wall_seconds", "memory_gib_seconds", "gpu_seconds", "max_rss_bytes")


class Unfundable(Exception):
    """No provider online that could run a task would be paid from its escrow (a budget too
    small for one billing interval, or cpus=0, where only priced providers fit)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a task was granted on one provider: the ceiling of what it can be billed for."""

    cpus: float
    memory_bytes: int
    gpus: float

    @classmethod
    def of(cls, spec: TaskSpec, ad: ProviderAd) -> Grant:
        """The task's requested resources; memory, when not asked for, is the provider's memory
        shared among its slots (what each task process may use)."""
        res = spec.resources
        memory = int(res.get("memory") or ad.memory // max(ad.slots, 1))
        return cls(float(res.get("cpus", 1)), memory, float(res.get("gpus", 0)))


def _finite(value: object) -> float:
    """A reported figure as a non-negative finite float (anything else counts as zero)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def cap_usage(usage: dict, grant: Grant, wall: float) -> dict[str, float]:
    """``usage`` as the gateway believes it: each figure at most what ``grant`` allows over
    ``wall`` seconds (the gateway's own clock since it sent the assignment). A provider cannot be
    paid for more CPU, memory or GPU time than the task could have had, whatever it reports."""
    wall = _finite(wall)
    ceilings = {
        "cpu_seconds": grant.cpus * wall,
        "wall_seconds": wall,
        "memory_gib_seconds": grant.memory_bytes / 2**30 * wall,
        "gpu_seconds": grant.gpus * wall,
        "max_rss_bytes": float(grant.memory_bytes),
    }
    return {k: round(min(_finite(usage[k]), ceilings[k]), 6) for k in USAGE_KEYS if k in usage}


def price_micro(usage: dict[str, float], prices: dict[str, float]) -> int:
    """What ``usage`` costs at ``prices`` (tokens per CPU-second, GiB-second, GPU-second);
    never more than the ledger can move at once, whatever the figures."""
    tokens = (_finite(usage.get("cpu_seconds", 0.0)) * _finite(prices.get("cpu", 0.0))
              + _finite(usage.get("memory_gib_seconds", 0.0)) * _finite(prices.get("memory", 0.0))
              + _finite(usage.get("gpu_seconds", 0.0)) * _finite(prices.get("gpu", 0.0)))
    if not math.isfinite(tokens) or tokens * 1e6 >= MAX_MICRO:
        return MAX_MICRO
    return to_micro(round(tokens, 6))


def is_free(ad: ProviderAd) -> bool:
    """A provider whose every price is zero: it needs no escrow and is never paid."""
    return not any(_finite(v) for v in ad.prices.values())


def min_charge_micro(spec: TaskSpec, ad: ProviderAd) -> int:
    """One billing interval of what the task asked for (CPUs, GPUs, and memory if it named an
    amount: an unnamed share is a ceiling, not a promise) at ``ad``'s prices."""
    res, t = spec.resources, MIN_BILLING_SECONDS
    usage = {"cpu_seconds": float(res.get("cpus", 1)) * t,
             "gpu_seconds": float(res.get("gpus", 0)) * t,
             "memory_gib_seconds": int(res.get("memory") or 0) / 2**30 * t}
    return max(1, price_micro(usage, ad.prices))


def why_unaffordable(escrow_micro: int, spec: TaskSpec, ad: ProviderAd) -> str | None:
    """None if a task holding ``escrow_micro`` may run on ``ad``'s provider, else why not: a
    priced provider never takes a task that holds no escrow, asks for no CPU, or whose escrow
    cannot pay for one billing interval there."""
    if is_free(ad):
        return None
    if not escrow_micro:
        return "a priced provider; this task holds no escrow (budget=0 or only free providers fit)"
    if not spec.resources.get("cpus", 1):
        return "a priced provider; a cpus=0 task runs only on free providers"
    need = min_charge_micro(spec, ad)
    if escrow_micro < need:
        return (f"its escrow of {to_tokens(escrow_micro):g} tokens cannot pay for"
                f" {MIN_BILLING_SECONDS:g} s there ({to_tokens(need):g} tokens)")
    return None


def result_hash(buffers: Sequence[memoryview]) -> str:
    """Hash of a result's bytes, as the gateway saw them (receipts, redundancy votes)."""
    h = hashlib.blake2b(digest_size=32)
    for b in buffers:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def failure_hash(result: Result) -> str:
    """A failed task's receipt names what it failed with, hashed like a result."""
    err = result.error
    text = f"{result.status}|{result.code}|{err.module}.{err.type}|{err.message}" if err else (
        f"{result.status}|{result.code}")
    return result_hash([memoryview(text.encode())])


@dataclass(frozen=True, slots=True)
class Share:
    """One provider's part in a final settlement: its ballot, capped usage, prices and pay."""

    account: str
    result_hash: str
    usage: dict
    prices: dict
    paid_micro: int


@dataclass(frozen=True, slots=True)
class Settled:
    """A final settlement to log: one leaf of the receipt log (see :mod:`gateway.receipt_log`)."""

    task_id: str
    client: str
    function_hash: str
    input_hash: str
    shares: tuple[Share, ...]
    outcome: str
    amount_micro: int
    fee_micro: int
    items: list[str] | None = None  # a chunk's per-item result hashes

    def entry(self, time_ms: int) -> bytes:
        return settlement_entry(
            task_id=self.task_id, client=self.client, function_hash=self.function_hash,
            input_hash=self.input_hash, outcome=self.outcome, amount_micro=self.amount_micro,
            fee_micro=self.fee_micro, time_ms=time_ms,
            providers=[{"account": s.account, "result_hash": s.result_hash, "usage": s.usage,
                        "prices": s.prices, "paid_micro": s.paid_micro} for s in self.shares],
            items=self.items)


@dataclass(frozen=True, slots=True)
class Charge:
    """One settlement's outcome for the hub: the running cost and whether the escrow is spent."""

    charged_micro: int
    fee_micro: int
    spent: bool

    @property
    def cost(self) -> float:
        return to_tokens(self.charged_micro)


class Billing:
    """Prices, escrows and receipt-log leaves for one gateway: the core's side of the money."""

    def __init__(self, ledger: Ledger, identity: Identity, default_escrow: float = 1.0,
                 receipt_log: ReceiptLog | None = None) -> None:
        self.ledger = ledger  # read by the shell (loads, lookups after a restart), never here
        self.identity = identity
        self.default_escrow_micro = to_micro(default_escrow)
        self.accounts = Accounts(ledger.fee_ppm)
        self._log = receipt_log
        self._tokens = 0

    @property
    def log(self) -> ReceiptLog:
        """The receipt log, in the ledger's database file (opened on first use)."""
        if self._log is None:
            self._log = ReceiptLog(self.ledger.path)
        return self._log

    def escrow_for(self, spec: TaskSpec) -> int:
        if spec.budget is not None:
            return to_micro(spec.budget)
        if spec.max_price is not None and spec.timeout is not None:
            return to_micro(spec.max_price * spec.resources.get("cpus", 1) * spec.timeout)
        return self.default_escrow_micro * max(spec.items, 1)  # a chunk's: per item

    def hold(self, items: Sequence[tuple[str, str, TaskSpec]]) -> list[LedgerError | None]:
        """Escrow for each ``(task_id, account, spec)``: None, or why it was refused
        (:class:`InsufficientFunds` when the balance is short)."""
        return [self.accounts.hold(task_id, account, self.escrow_for(spec))
                for task_id, account, spec in items]

    def settle(self, items: Sequence[tuple[str, str, dict, dict, bool]]) -> list[Charge | None]:
        """Settle ``(task_id, provider_account, usage, prices, final)`` cumulatively; None for a
        task the books refused (logged). A refused FINAL settlement still closes its escrow
        (what was paid stays paid, the rest goes back to the client), so no escrow outlives its
        task; its charge is then what the escrow ended at."""
        charges: list[Charge | None] = []
        for tid, acct, usage, prices, final in items:
            res = self.accounts.settle(tid, acct, price_micro(usage, prices), final)
            if isinstance(res, LedgerError):
                log.error("settlement of %s refused: %s", tid, res)
                charges.append(self.close([tid])[0] if final else None)
            else:
                charges.append(Charge(res.charged_micro, res.fee_micro, res.capped))
        return charges

    def log_leaf(self, settled: Settled, escrows: Sequence[str]) -> int | None:
        """Queue a final settlement's leaf (committed with the settlement, in the accounting
        worker's next group); returns its token, or None if it cannot be logged (its money
        moved all the same; the client just gets no proof)."""
        try:
            entry = settled.entry(int(time.time() * 1000))
        except ValueError as exc:
            log.error("settlement of %s cannot be logged: %s", settled.task_id, exc)
            return None
        token = self.next_token()
        self.accounts.log(Leaf(token, entry, tuple(escrows)))
        return token

    def next_token(self) -> int:
        """A fresh leaf token (names a leaf in the accounting worker's answer)."""
        self._tokens += 1
        return self._tokens

    def refund(self, task_ids: Sequence[str]) -> None:
        """Close these escrows, returning what is left to the client; an id with no open escrow
        (a free task holds none, or it was closed already) is skipped."""
        self.close(task_ids)

    def close(self, task_ids: Sequence[str]) -> list[Charge | None]:
        """:meth:`refund`, saying for each id what its escrow charged in all (None: no escrow):
        what the client's balance lost for that task, so its result can say so."""
        out: list[Charge | None] = []
        for task_id in task_ids:
            totals = self.accounts.close(task_id)
            out.append(None if totals is None else Charge(*totals, spent=False))
        return out

    def balance(self, account: str) -> dict[str, float]:
        """``{"available": tokens, "held": tokens}``: spendable now, and in open escrow."""
        return {"available": to_tokens(self.accounts.balance(account)),
                "held": to_tokens(self.accounts.held[account])}

    def earnings(self, account: str) -> float:
        return to_tokens(self.accounts.earnings[account])
