"""Signed settlement receipts: the gateway's word on what a task cost, checkable by anyone.

Owns: a receipt's fields, their canonical bytes, signing and verification. Must never: take the
signing key from the receipt itself (the verifier supplies the gateway key it trusts; the
``gateway`` field only has to match it), or raise while verifying (malformed means invalid).

A receipt is a plain dict of str/int/float (and two flat dicts of numbers) so it travels as
msgpack on the wire and as JSON on disk; both keep ints and floats apart, so it verifies after
either round trip.

Canonical encoding, the exact bytes the Ed25519 signature covers::

    b"decompute-receipt-v1\\n" + JSON(every field except "signature")

with JSON as ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)``: keys sorted at every level, no whitespace, non-ASCII escaped, ints printed as
ints and floats as their shortest round-trip repr. The prefix is domain separation: a receipt
signature can never pass for an authentication answer (those sign ``decompute-auth-v1|...``) or
anything else the gateway key signs.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.identity import Identity, verify
from gateway.receipt_log import check_item_result, verify_log_receipt

RECEIPT_VERSION = 1
RECEIPT_CONTEXT = b"decompute-receipt-v1\n"
_TEXT_FIELDS = ("task_id", "client", "provider", "gateway", "result_hash")
_MICRO_FIELDS = ("amount_micro", "fee_micro")
_NUMBER_MAPS = ("usage", "prices")
RECEIPT_FIELDS = frozenset(
    {"version", "settled_at", "signature", *_TEXT_FIELDS, *_MICRO_FIELDS, *_NUMBER_MAPS}
)


def make_receipt(
    identity: Identity,
    *,
    task_id: str,
    client: str,
    provider: str,
    usage: Mapping[str, float],
    prices: Mapping[str, float],
    amount_micro: int,
    fee_micro: int,
    result_hash: str,
    settled_at: float,
) -> dict[str, Any]:
    """Sign a settlement with the gateway's ``identity``.

    ``amount_micro`` is what the client was charged for the task, ``fee_micro`` the part of it the
    gateway kept: the provider received ``amount_micro - fee_micro``. ``usage`` and ``prices`` are
    the metered totals and the provider's posted prices (numbers, e.g. numpy scalars, become
    plain ints or floats). Raises ``TypeError``/``ValueError`` on fields that could not verify.
    """
    body: dict[str, Any] = {
        "version": RECEIPT_VERSION,
        "task_id": task_id,
        "client": client,
        "provider": provider,
        "gateway": identity.account,
        "usage": {str(k): _plain_number(v) for k, v in usage.items()},
        "prices": {str(k): _plain_number(v) for k, v in prices.items()},
        "amount_micro": amount_micro,
        "fee_micro": fee_micro,
        "result_hash": result_hash,
        "settled_at": _plain_number(settled_at),
    }
    problem = _problem(body)
    if problem:
        raise ValueError(f"cannot sign receipt for task {task_id!r}: {problem}")
    return {**body, "signature": identity.sign(signed_bytes(body)).hex()}


def signed_bytes(receipt: Mapping[str, Any]) -> bytes:
    """The canonical bytes of ``receipt`` that the signature covers (see the module docstring)."""
    body = {k: v for k, v in receipt.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return RECEIPT_CONTEXT + text.encode("ascii")


def verify_receipt(receipt: object, gateway_public_key: str | bytes,
                   result: Sequence[bytes | bytearray | memoryview] | None = None) -> bool:
    """True only for a well-formed receipt signed by ``gateway_public_key`` (hex or 32 raw bytes).

    A receipt of the log (``{entry, index, proof, head}``, what gateways issue now) is checked by
    :func:`gateway.receipt_log.check_log_receipt`: signed head, inclusion proof, canonical entry
    that adds up. An item receipt (a chunk's receipt plus ``item``, what each future of a
    chunked ``map`` holds) verifies as its chunk's; given ``result``, the item's result buffers
    as they arrived, its leaf must also list their hash as the item's outcome (a leaf that lists
    no items cannot, so that is False). A per-task signed receipt of the older format still
    verifies as before. Never raises: anything malformed, tampered with or signed by another key
    is just False.
    """
    if isinstance(receipt, Mapping) and "entry" in receipt:
        if result is None:
            return verify_log_receipt(receipt, gateway_public_key)
        try:
            from gateway.billing import result_hash  # the gateway's own hashing of results

            digest = result_hash([memoryview(b) for b in result])
            check_item_result(receipt, gateway_public_key, digest)
        except Exception:  # a verifier's promise: malformed input is invalid, never an exception
            return False
        return True
    try:
        if not isinstance(receipt, dict) or set(receipt) != RECEIPT_FIELDS or _problem(receipt):
            return False
        if isinstance(gateway_public_key, str):
            key = bytes.fromhex(gateway_public_key)
        elif isinstance(gateway_public_key, bytes | bytearray | memoryview):
            key = bytes(gateway_public_key)
        else:
            return False
        signature = receipt["signature"]
        if len(key) != 32 or receipt["gateway"] != key.hex() or not isinstance(signature, str):
            return False
        raw = bytes.fromhex(signature)
        if raw.hex() != signature:  # one spelling per signature: lowercase hex, no spaces
            return False
        return verify(key, raw, signed_bytes(receipt))
    except Exception:  # a verifier's promise: malformed input is invalid, never an exception
        return False


def _plain_number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected a number, got {type(value).__name__}: {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _problem(receipt: Mapping[str, Any]) -> str | None:
    """What makes ``receipt`` (signature aside) malformed, or None when its shape is right."""
    if receipt.get("version") != RECEIPT_VERSION or isinstance(receipt.get("version"), bool):
        return f"version must be {RECEIPT_VERSION}"
    for name in _TEXT_FIELDS:
        if not isinstance(receipt.get(name), str) or not receipt[name]:
            return f"{name} must be a non-empty str"
    for name in _MICRO_FIELDS:
        value = receipt.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0 (micro-tokens)"
    if receipt["fee_micro"] > receipt["amount_micro"]:
        return "fee_micro cannot exceed amount_micro"
    for name in _NUMBER_MAPS:
        value = receipt.get(name)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in value.items()
        ):
            return f"{name} must map str to finite numbers"
    if not _is_number(receipt.get("settled_at")):
        return "settled_at must be a finite number (unix seconds)"
    return None
