"""``Client.transfer``: pay another account, and keep the receipt of it.

The checks here are for the user's sake (a clear error before anything is sent); the gateway
checks every field again (:mod:`gateway.transfers`), since a client is untrusted too.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.ledger import MAX_MICRO, to_micro
from gateway.transfers import MAX_MEMO, is_account
from notebook_ext import errors
from notebook_ext.money import Receipt


def payee_of(account: Any) -> str:
    """An account id from what a user holds: the id itself, or anything with ``.account``
    (a ``ProviderInfo``, another ``Client``)."""
    account = getattr(account, "account", account)
    if not is_account(account):
        raise ValueError(f"transfer: {str(account)[:80]!r} is not an account id (64 lowercase hex"
                         " digits, as client.account and client.providers() show)")
    return account


def micro_of(tokens: Any) -> int:
    """A positive, finite amount of tokens as micro-tokens (whole micro-tokens only)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int | float):
        raise TypeError(f"transfer: tokens must be a number, not {type(tokens).__name__}")
    if not math.isfinite(tokens) or tokens <= 0:
        raise ValueError(f"transfer: tokens must be a positive finite number, not {tokens}")
    micro = to_micro(tokens)
    if not 1 <= micro <= MAX_MICRO:
        raise ValueError(f"transfer: {tokens} tokens is not between one micro-token (1e-6) and"
                         " 2**53 micro-tokens")
    return micro


class Payments:
    """The ``transfer`` method of :class:`notebook_ext.client.Client` (a mixin)."""

    def transfer(self, account: Any, tokens: float, memo: str = "") -> Receipt:
        """Pay ``tokens`` of this account's balance to ``account`` (an id, a ``ProviderInfo`` or
        another ``Client``); returns the signed receipt once the payment is a leaf of the
        gateway's receipt log (``verify_receipt(receipt, client.gateway_key)`` checks it).

        The payee gets exactly ``tokens`` (transfers carry no gateway fee). The leaf records the
        memo's SHA-256, not the memo. Raises ``InsufficientFunds`` when the balance is short,
        ``GatewayRefused`` for an account the gateway has never seen (or any other refusal),
        ``ValueError``/``TypeError`` for a malformed request (nothing is sent then).
        """
        payee = payee_of(account)
        if payee == self.account:
            raise ValueError("transfer: an account cannot pay itself")
        micro = micro_of(tokens)
        if not isinstance(memo, str) or len(memo) > MAX_MEMO:
            raise ValueError(f"transfer: memo must be a str of at most {MAX_MEMO} characters")
        try:
            data = self._request("transfer", {"to": payee, "micro": micro, "memo": memo})
        except errors.GatewayRefused as exc:
            if str(exc).startswith("transfer: insufficient funds"):
                raise errors.InsufficientFunds(str(exc)) from None
            raise
        receipt = data.get("receipt") if isinstance(data, dict) else None
        if receipt is None:
            raise errors.GatewayRefused(
                "transfer: the payment was booked but the gateway could not sign its receipt now;"
                " its leaf is in the receipt log (see /log/entries)")
        self._receipt_book.add(receipt)
        return Receipt(receipt)
