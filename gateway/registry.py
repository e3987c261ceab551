"""The providers online now: what each offers, what it is running, what it has been sent.

The registry only records; matching a task to a provider is :mod:`gateway.scheduler`'s job.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.protocol import ProviderAd, Send

#: Function blobs the gateway remembers having sent to one provider. The provider keeps a FIFO
#: twice this size of exactly the blobs we send, in the same order, so whatever is in this set is
#: certainly still in the provider's cache and need not be resent.
SENT_FUNCS_REMEMBERED = 512

#: Tasks queued on a provider beyond its slots, at least.
PREFETCH_MIN = 8


@dataclass(slots=True, eq=False)
class ProviderConn:
    """One connected provider. ``send`` queues a frame on its websocket."""

    id: str
    account: str
    ad: ProviderAd
    send: Send
    running: set[str] = field(default_factory=set)
    sent_funcs: OrderedDict[str, None] = field(default_factory=OrderedDict)
    load: dict[str, float] = field(default_factory=dict)
    joined: float = field(default_factory=time.time)
    served: int = 0
    #: Whether this connection's account owns its advertised name (pins by name reach it only
    #: then; see :mod:`gateway.names`).
    owns_name: bool = True

    @property
    def capacity(self) -> int:
        """How many tasks it may hold: its slots plus a prefetch (as many again, at least
        PREFETCH_MIN), so a provider has the next tasks at hand when one finishes and a map of
        tiny tasks is not bound by the round trip to the gateway."""
        return self.ad.slots + max(self.ad.slots, PREFETCH_MIN)

    @property
    def free(self) -> int:
        return self.capacity - len(self.running)

    def needs_func(self, func_hash: str) -> bool:
        """True (and remembered) the first time a function is sent to this provider."""
        if func_hash in self.sent_funcs:
            return False
        self.sent_funcs[func_hash] = None
        if len(self.sent_funcs) > SENT_FUNCS_REMEMBERED:
            self.sent_funcs.popitem(last=False)
        return True

    def answers_to(self, pins: list) -> bool:
        """True if a ``providers=[...]`` pin names this connection: its id, its account, or its
        name when its account owns that name."""
        return (self.id in pins or self.account in pins
                or (self.owns_name and self.ad.name in pins))

    def info(self) -> dict:
        """What ``client.providers()`` shows about it."""
        ad = self.ad
        return {
            "id": self.id, "account": self.account, "name": ad.name, "cpus": ad.cpus,
            "memory": ad.memory, "gpus": ad.gpus, "prices": dict(ad.prices),
            "runtime": {"python": ad.runtime.python, "cloudpickle": ad.runtime.cloudpickle},
            "sandbox": ad.sandbox, "slots": ad.slots, "running": len(self.running),
            "load": dict(self.load), "served": self.served, "online": True,
        }


def stable_id(name: str, account: str) -> str:
    """A provider's id: the same across reconnects, so pins and the panel's choices survive."""
    return f"{name}-{account[:8]}"


class Registry:
    """Providers by id, in the order they joined, and by account."""

    def __init__(self) -> None:
        self._providers: dict[str, ProviderConn] = {}
        self._by_account: dict[str, list[ProviderConn]] = {}

    def free_id(self, name: str, account: str) -> str:
        """The stable id for ``name`` and ``account``; a second live connection of the same
        account and name gets ``-2``, a third ``-3``, and so on."""
        base = stable_id(name, account)
        if base not in self._providers:
            return base
        n = 2
        while f"{base}-{n}" in self._providers:
            n += 1
        return f"{base}-{n}"

    def add(self, conn: ProviderConn) -> None:
        self._providers[conn.id] = conn
        self._by_account.setdefault(conn.account, []).append(conn)

    def remove(self, conn_id: str) -> ProviderConn | None:
        conn = self._providers.pop(conn_id, None)
        if conn is not None:
            same = [c for c in self._by_account.get(conn.account, []) if c is not conn]
            if same:
                self._by_account[conn.account] = same
            else:
                self._by_account.pop(conn.account, None)
        return conn

    def of_account(self, account: str) -> list[ProviderConn]:
        """The live connections of one provider account."""
        return self._by_account.get(account, [])

    def get(self, conn_id: str) -> ProviderConn | None:
        return self._providers.get(conn_id)

    def __iter__(self):
        return iter(list(self._providers.values()))

    def __len__(self) -> int:
        return len(self._providers)

    def runtimes(self) -> list[str]:
        """The distinct runtimes online, for a clear ``NoMatchingProvider`` message."""
        return sorted({str(p.ad.runtime) for p in self._providers.values()})
