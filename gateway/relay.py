"""Moving kept results: provider -> gateway -> provider (a dependent runs elsewhere) or client.

Providers cannot reach each other, so the gateway relays the bytes, opaque, never unpickled,
never stored: a Fetch goes to one holder, its Data frame is forwarded to every provider waiting
for that key and to every client that asked. Release tells holders to free what nobody needs.

Providers are untrusted: a ``Data`` frame or a "missing" report is believed only from the provider
the gateway asked, for the key it asked, while that fetch is open. Anything else (another
session's key, a key nobody fetched, a second answer) is dropped and counted, so a stranger can
neither inject bytes into a client's fetch or a dependent task nor make the gateway recompute
(and bill) someone's result.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from gateway import protocol as p
from gateway.graph import Graph
from gateway.registry import Registry
from gateway.sessions import ClientSession

log = logging.getLogger(__name__)


class Relay:
    """Fetches, deliveries and releases of kept results."""

    def __init__(self, registry: Registry, graph: Graph,
                 sessions: dict[str, ClientSession],
                 on_lost_result: Callable[[str], None]) -> None:
        self.registry = registry
        self.graph = graph
        self.sessions = sessions
        self.on_lost_result = on_lost_result

    def deliver(self, key: str, provider_id: str) -> None:
        """``provider_id`` will run a task that needs ``key``: get the bytes there."""
        self.graph.deliveries[key].add(provider_id)
        self.request(key)

    def fetch_for_client(self, session: ClientSession, keys: Sequence[str]) -> list[str]:
        """A client asks for kept results; returns the keys this session does not have."""
        unknown = []
        for key in keys:
            task_id = f"{session.id}/{key}"
            if task_id not in self.graph.nodes:
                unknown.append(key)
                continue
            self.graph.client_fetches[task_id].add(session.id)
            self.request(task_id)
        return unknown

    def request(self, key: str) -> None:
        """Ask one holder for ``key``'s bytes unless a fetch is already under way."""
        node = self.graph.nodes.get(key)
        if node is None or key in self.graph.fetching or not node.available:
            return  # it will be requested again once it is (re)computed
        wanted = self.graph.deliveries.get(key, set())
        holders = [h for h in node.who_has if h not in wanted or len(node.who_has) == 1]
        source = self.registry.get(holders[0] if holders else next(iter(node.who_has)))
        if source is None:
            return
        self.graph.fetching[key] = source.id
        source.send(p.encode(p.Fetch(keys=[key])))

    def data(self, sender_id: str, msg: p.Data, buffers: Sequence[memoryview]) -> Counter[str]:
        """A holder answered: forward the bytes to whoever waits for them. Returns what was
        dropped, by reason (answers nobody asked this sender for)."""
        dropped: Counter[str] = Counter()
        for key, bufs in zip(msg.keys, p.split_buffers(msg.nbs, buffers), strict=True):
            if self.graph.fetching.get(key) != sender_id:
                log.debug("dropping data for %.80s from %s: no open fetch asked it", key,
                            sender_id)
                dropped["data_not_asked"] += 1
                continue
            del self.graph.fetching[key]
            node = self.graph.nodes.get(key)
            nbytes = sum(b.nbytes for b in bufs)
            for dest_id in self.graph.deliveries.pop(key, set()):
                dest = self.registry.get(dest_id)
                if dest is None or dest_id == sender_id:
                    continue
                dest.send(p.encode_parts(p.Data(keys=[key], nbs=[len(bufs)]), bufs))
                self.graph.bytes_moved += nbytes
                if node is not None:
                    node.who_has.add(dest_id)
            for session_id in self.graph.client_fetches.pop(key, set()):
                session = self.sessions.get(session_id)
                if session is not None:
                    result = p.Result(key=key.split("/", 1)[1], status="finished", nb=len(bufs),
                                      stored=True, nbytes=nbytes)
                    session.send(p.encode_parts(p.Results(results=[result]), bufs))
        for key in msg.missing:  # the holder lost or freed it: try another, or recompute
            if self.graph.fetching.get(key) != sender_id:
                log.debug("dropping a missing report for %.80s from %s: no open fetch asked"
                            " it", key, sender_id)
                dropped["missing_not_asked"] += 1
                continue
            del self.graph.fetching[key]
            node = self.graph.nodes.get(key)
            if node is None:
                continue
            node.who_has.discard(sender_id)
            if node.who_has:
                self.request(key)
            else:
                self.on_lost_result(key)
        return dropped

    def release(self, keys: Sequence[str]) -> None:
        """Free kept results that nobody needs, on every provider holding them."""
        by_holder: dict[str, list[str]] = {}
        for key in keys:
            for holder in self.graph.free(key):
                by_holder.setdefault(holder, []).append(key)
        for holder_id, held in by_holder.items():
            conn = self.registry.get(holder_id)
            if conn is not None:
                conn.send(p.encode(p.Release(keys=held)))
