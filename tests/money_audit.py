"""The books after an attack (issue 9, acceptance 12): conservation holds, and no escrow is still
held once every task of the test has ended (finished, failed, cancelled, or its provider gone).

Read from the gateway's own SQLite file (WAL: safe beside the running gateway) through
``Ledger.check(live=...)``, which re-derives every balance from the transfer rows.
"""

from __future__ import annotations

from pathlib import Path

from helpers import wait_for

from gateway.ledger import Ledger, LedgerInvariantError


def books_settle(db: Path, timeout: float = 20.0) -> None:
    """Wait (with a deadline) until the ledger at ``db`` is conserved and holds no escrow."""
    last: list[str] = [""]

    def settled() -> bool:
        try:
            with Ledger(db) as led:
                led.check(live=())
        except LedgerInvariantError as exc:
            last[0] = str(exc)
            return False
        return True

    try:
        wait_for(settled, timeout, interval=0.1, message="a conserved ledger with no held escrow")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0]}") from None
