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


class Registry:
    """Providers by connection id, in the order they joined."""

    def __init__(self) -> None:
        self._providers: dict[str, ProviderConn] = {}

    def add(self, conn: ProviderConn) -> None:
        self._providers[conn.id] = conn

    def remove(self, conn_id: str) -> ProviderConn | None:
        return self._providers.pop(conn_id, None)

    def get(self, conn_id: str) -> ProviderConn | None:
        return self._providers.get(conn_id)

    def __iter__(self):
        return iter(list(self._providers.values()))

    def __len__(self) -> int:
        return len(self._providers)

    def runtimes(self) -> list[str]:
        """The distinct runtimes online, for a clear ``NoMatchingProvider`` message."""
        return sorted({str(p.ad.runtime) for p in self._providers.values()})
