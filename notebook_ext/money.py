"""Money as the user sees it: a balance of available and held tokens, receipts that read in
tokens and ISO times, and the refusal of work the balance cannot cover.

Display only: the gateway's ledger is the truth, and a receipt stays the gateway's signed dict,
unchanged, so ``verify_receipt`` checks exactly what was signed.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from notebook_ext import errors


class Balance(float):
    """An account's balance in tokens: the value is what is *available* to spend; ``held`` is
    what open tasks hold in escrow right now (it comes back, less what they cost)."""

    available: float
    held: float

    def __new__(cls, available: float, held: float = 0.0) -> Balance:
        self = super().__new__(cls, available)
        self.available = float(available)
        self.held = float(held)
        return self

    @classmethod
    def from_reply(cls, data: Any) -> Balance:
        """The gateway's answer: ``{"available": t, "held": t}`` (or a plain number, from a
        gateway that predates escrow reporting)."""
        if isinstance(data, dict):
            return cls(float(data.get("available", 0.0)), float(data.get("held", 0.0)))
        return cls(float(data))

    def __repr__(self) -> str:
        return f"Balance({self.available:.6g} available, {self.held:.6g} held)"

    def __reduce__(self) -> tuple:
        return (Balance, (self.available, self.held))


def refuse_unaffordable(balance: Balance, budget: float, n: int, redundancy: int,
                        account: str) -> None:
    """``InsufficientFunds`` if ``n`` tasks of ``budget`` tokens (x ``redundancy``) cannot be
    held in escrow from what is available; nothing has been sent yet."""
    need = float(budget) * n * max(1, int(redundancy or 1))
    if need > balance.available:
        raise errors.InsufficientFunds(
            f"{n} task(s) with budget={budget:g} (x redundancy) need {need:g} tokens in "
            f"escrow, but account {account} has {balance.available:g} available "
            f"({balance.held:g} held by running tasks); nothing was sent. Lower budget=, "
            f"wait for running tasks to finish, or top up with `decompute-gateway mint "
            f"{account} AMOUNT --db FILE`")


class Receipt(dict):
    """A signed settlement receipt: the gateway's raw dict, unchanged, so
    ``verify_receipt(fut.receipt, client.gateway_key)`` checks it as signed; it only *shows*
    itself readably (tokens instead of micro-tokens, ISO times instead of epoch seconds)."""

    def __missing__(self, name: str) -> Any:
        """A receipt of the log reads like the settlement it proves: ``receipt["amount_micro"]``,
        ``["task_id"]``, ``["provider"]`` (the first provider), ``["usage"]``, ... come from its
        entry. Reading only: the dict's own keys, what verifies, stay exactly as signed."""
        entry = dict.get(self, "entry")
        if not isinstance(entry, str):
            raise KeyError(name)
        settled = json.loads(entry)
        first = (settled.get("providers") or [{}])[0]
        view = {**settled, "provider": first.get("account"), "usage": first.get("usage"),
                "prices": first.get("prices"), "result_hash": settled.get("outcome"),
                "settled_at": settled.get("time_ms", 0) / 1000}
        if name not in view:
            raise KeyError(name)
        return view[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def readable(self) -> dict[str, Any]:
        """The receipt as a person reads it: tokens, UTC ISO-8601 time, short ids."""
        settled = self.get("settled_at")
        when = (datetime.datetime.fromtimestamp(settled, datetime.UTC).isoformat(timespec="seconds")
                if isinstance(settled, (int, float)) else settled)
        return {
            "task": self.get("task_id"),
            "charged_tokens": self.get("amount_micro", 0) / 1e6,
            "fee_tokens": self.get("fee_micro", 0) / 1e6,
            "provider": str(self.get("provider", ""))[:16],
            "usage": dict(self.get("usage") or {}),
            "prices": dict(self.get("prices") or {}),
            "settled_at": when,
            "gateway": str(self.get("gateway", ""))[:16],
        }

    def __repr__(self) -> str:
        r = self.readable()
        return (f"Receipt(task {r['task']}: {r['charged_tokens']:.6g} tokens charged "
                f"(fee {r['fee_tokens']:.6g}) by provider {r['provider']} at {r['settled_at']}; "
                f"signed by gateway {r['gateway']}; verify_receipt(receipt, key) checks it)")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))
