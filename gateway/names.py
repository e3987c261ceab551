"""Provider names, bound to the first account that registers each, for good.

A name is how people pin tasks (``providers=["my-laptop"]``) and read the panel, so another
account must never be able to take it over: the binding is kept in the gateway's database (its
own table beside the ledger's), and a pin by name reaches only the owning account's connections.
A connection under someone else's name is still served, but no pin by that name reaches it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS provider_names (
    name TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    bound_at REAL NOT NULL
)
"""


class Names:
    """Name -> owning account. ``path=None`` keeps the bindings in memory (tests, no database)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._db = sqlite3.connect(":memory:" if path is None else str(path), timeout=10.0)
        self._db.execute(SCHEMA)
        self._db.commit()
        self._owners: dict[str, str] = dict(
            self._db.execute("SELECT name, account FROM provider_names").fetchall())

    def owner(self, name: str) -> str | None:
        return self._owners.get(name)

    def bind(self, name: str, account: str) -> bool:
        """Bind ``name`` to ``account`` unless another account has it; True if ``account`` owns
        it now."""
        owner = self._owners.get(name)
        if owner is not None:
            return owner == account
        self._db.execute("INSERT OR IGNORE INTO provider_names VALUES (?, ?, ?)",
                         (name, account, time.time()))
        self._db.commit()
        self._owners[name] = account
        log.info("provider name %r bound to account %s", name, account[:16])
        return True

    def close(self) -> None:
        self._db.close()
