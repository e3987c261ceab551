"""The providers online now: what each offers, what it is running, what it has been sent.

The registry only records; matching a task to a provider is :mod:`gateway.scheduler`'s job. It
also notes which providers' task sets changed since the scheduler last looked
(:meth:`Registry.take_changed`), so that placement re-ranks those few instead of every provider
online: at 1,000 providers a pass over all of them per placement cost more than the task.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.packages import notable
from gateway.protocol import ProviderAd, Send

#: Function blobs the gateway remembers having sent to one provider. The provider keeps a FIFO
#: twice this size of exactly the blobs we send, in the same order, so whatever is in this set is
#: certainly still in the provider's cache and need not be resent.
SENT_FUNCS_REMEMBERED = 512

#: Tasks queued on a provider beyond its slots, at least.
PREFETCH_MIN = 8


class Running(set):
    """A provider's task ids (a set) that reports every change to a watcher: the registry, which
    keeps a note of the providers the scheduler must re-rank."""

    __slots__ = ("watch",)

    def __init__(self, items: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.watch: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.watch is not None:
            self.watch()

    def add(self, item: str) -> None:
        super().add(item)
        self._changed()

    def discard(self, item: str) -> None:
        super().discard(item)
        self._changed()

    def remove(self, item: str) -> None:
        super().remove(item)
        self._changed()

    def pop(self) -> str:
        item = super().pop()
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *others: Iterable[str]) -> None:
        super().update(*others)
        self._changed()

    def difference_update(self, *others: Iterable[str]) -> None:
        super().difference_update(*others)
        self._changed()

    def intersection_update(self, *others: Iterable[str]) -> None:
        super().intersection_update(*others)
        self._changed()

    def symmetric_difference_update(self, other: Iterable[str]) -> None:
        super().symmetric_difference_update(other)
        self._changed()

    def __ior__(self, other):  # type: ignore[override]
        self.update(other)
        return self

    def __isub__(self, other):  # type: ignore[override]
        self.difference_update(other)
        return self

    def __iand__(self, other):  # type: ignore[override]
        self.intersection_update(other)
        return self

    def __ixor__(self, other):  # type: ignore[override]
        self.symmetric_difference_update(other)
        return self


@dataclass(slots=True, eq=False)
class ProviderConn:
    """One connected provider. ``send`` queues a frame on its websocket."""

    id: str
    account: str
    ad: ProviderAd
    send: Send
    running: set[str] = field(default_factory=Running)
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
            "packages": notable(ad.packages), "installs": ad.installs,
        }


def stable_id(name: str, account: str) -> str:
    """A provider's id: the same across reconnects, so pins and the panel's choices survive."""
    return f"{name}-{account[:8]}"


class Registry:
    """Providers by id, in the order they joined, and by account."""

    def __init__(self) -> None:
        self._providers: dict[str, ProviderConn] = {}
        self._by_account: dict[str, list[ProviderConn]] = {}
        self._by_name: dict[str, list[ProviderConn]] = {}
        #: Providers whose task set changed (or that joined) since :meth:`take_changed`.
        self._changed: dict[str, ProviderConn] = {}
        #: Join order of each live connection: placement breaks ties by it.
        self.order: dict[str, int] = {}
        self._joined = 0
        #: Slots advertised by every provider online.
        self.total_slots = 0
        #: Bumped whenever a provider joins or leaves: a key for caches of "who is online".
        self.version = 0

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
        if not isinstance(conn.running, Running):
            conn.running = Running(conn.running)
        conn.running.watch = lambda: self._note(conn)
        old = self._providers.get(conn.id)
        if old is not None:
            self.remove(old.id)
        self._providers[conn.id] = conn
        self._by_account.setdefault(conn.account, []).append(conn)
        self._by_name.setdefault(conn.ad.name, []).append(conn)
        self._joined += 1
        self.order[conn.id] = self._joined
        self.total_slots += conn.ad.slots
        self.version += 1
        self._note(conn)

    def remove(self, conn_id: str) -> ProviderConn | None:
        conn = self._providers.pop(conn_id, None)
        if conn is not None:
            _drop(self._by_account, conn.account, conn)
            _drop(self._by_name, conn.ad.name, conn)
            del self.order[conn_id]
            self._changed.pop(conn_id, None)
            self.total_slots -= conn.ad.slots
            self.version += 1
            if isinstance(conn.running, Running):
                conn.running.watch = None
        return conn

    def readvertise(self, conn: ProviderConn, ad: ProviderAd) -> None:
        """A provider's own advertisement changed (its packages): what fits where may differ,
        so caches keyed on :attr:`version` start again and placement re-ranks it. Its name,
        slots and prices are the ones it joined with."""
        conn.ad = ad
        self.version += 1
        self._note(conn)

    def _note(self, conn: ProviderConn) -> None:
        self._changed[conn.id] = conn

    def take_changed(self) -> list[ProviderConn]:
        """The live providers whose task set changed (or that joined) since the last call."""
        changed, self._changed = self._changed, {}
        return [c for c in changed.values() if self._providers.get(c.id) is c]

    def pinned(self, pins: list) -> list[ProviderConn]:
        """The live connections a ``providers=[...]`` pin may name (by id, account or name), in
        join order; each still has to pass :meth:`ProviderConn.answers_to`."""
        found: dict[str, ProviderConn] = {}
        for pin in pins:
            if not isinstance(pin, str):
                continue
            if (conn := self._providers.get(pin)) is not None:
                found[conn.id] = conn
            for conn in (*self._by_account.get(pin, ()), *self._by_name.get(pin, ())):
                found[conn.id] = conn
        return sorted(found.values(), key=lambda c: self.order[c.id])

    def of_account(self, account: str) -> list[ProviderConn]:
        """The live connections of one provider account."""
        return self._by_account.get(account, [])

    def get(self, conn_id: str) -> ProviderConn | None:
        return self._providers.get(conn_id)

    def __iter__(self):
        return iter(list(self._providers.values()))

    def __len__(self) -> int:
        return len(self._providers)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._providers

    def runtimes(self) -> list[str]:
        """The distinct runtimes online, for a clear ``NoMatchingProvider`` message."""
        return sorted({str(p.ad.runtime) for p in self._providers.values()})


def _drop(index: dict[str, list[ProviderConn]], key: str, conn: ProviderConn) -> None:
    same = [c for c in index.get(key, []) if c is not conn]
    if same:
        index[key] = same
    else:
        index.pop(key, None)
