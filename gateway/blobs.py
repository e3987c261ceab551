"""Blobs on the gateway: where each one is held, and the transfers that move it cut-through.

The owner of two tables (sans-I/O; frames leave through ``send``):

- **blobs**: ``(account, id)`` -> size, the providers holding it, the client sessions that hold
  a scattered future for it. Ids are scoped by account, so one account can never make the
  gateway hand it another's bytes.
- **transfers**: one source (a client session or a provider) streaming one blob to one or more
  destinations. Each ``Chunk`` is checked (the sender is the transfer's source, the offset is
  the next one, the size is the blob's) and forwarded at once: nothing is stored here, and the
  shell stops reading the source while a destination's writer holds more than its window
  (back-pressure). A transfer from a provider of a content-named blob is hashed on the way and
  refused at its end if the bytes do not match their name.

The hub decides why a transfer runs (a task's argument, a result going to its client, a scatter)
and hears of each one that ends, completed or failed, through ``ended``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from gateway import protocol as p
from gateway.blob_messages import MAX_CHUNK, is_content_id, store_key

log = logging.getLogger(__name__)

#: A transfer end point: ("p", provider id) or ("c", client session id).
Peer = tuple[str, str]
BlobKey = tuple[str, str]  # (account, blob id)


@dataclass
class BlobInfo:
    """One account's blob as the gateway knows it."""

    account: str
    id: str
    size: int
    holders: set[str] = field(default_factory=set)
    #: Sessions holding a scattered future for it (the client can send it again: rescatter).
    scattered: set[str] = field(default_factory=set)


@dataclass
class Transfer:
    """One blob streaming from ``source`` to ``dests``."""

    x: int
    blob: BlobInfo
    source: Peer
    dests: set[Peer]
    offset: int = 0
    hasher: Any = None
    #: Why it runs, for the hub: ("task", task id) / ("result", task id) / ("scatter", session).
    purpose: tuple[str, str] = ("", "")


@dataclass
class Ended:
    """A transfer that ended: ``error`` is None when every destination got every byte."""

    transfer: Transfer
    error: str | None = None
    culprit: Peer | None = None


class Blobs:
    """The blob and transfer tables; see the module docstring."""

    def __init__(self, send: Callable[[Peer, p.Frame], bool]) -> None:
        self.send = send
        self.blobs: dict[BlobKey, BlobInfo] = {}
        self.transfers: dict[int, Transfer] = {}
        #: Transfers under way into a provider, by (provider id, account, blob id).
        self.inbound: dict[tuple[str, str, str], int] = {}
        self._ids = count(1)
        self.ended: list[Ended] = []
        self.moved_bytes = 0

    # ------------------------------------------------------------------ the table

    def note(self, account: str, blob_id: str, size: int) -> BlobInfo | str:
        """The blob ``(account, id)``, known from now on; a size that contradicts an earlier
        mention is an error string (the client reused an id for other bytes)."""
        info = self.blobs.get((account, blob_id))
        if info is None:
            info = self.blobs[(account, blob_id)] = BlobInfo(account, blob_id, size)
        elif info.size != size:
            return (f"blob {blob_id[:12]}… was named with {info.size} bytes before and "
                    f"{size} now; a blob id names one content")
        return info

    def get(self, account: str, blob_id: str) -> BlobInfo | None:
        return self.blobs.get((account, blob_id))

    def missing_bytes(self, account: str, refs: list, provider_id: str) -> int:
        """Bytes of ``refs`` that ``provider_id`` does not hold yet (for placement)."""
        total = 0
        for _, bid, size in refs:
            info = self.blobs.get((account, bid))
            if info is None or provider_id not in info.holders:
                total += size
        return total

    def evicted(self, provider_id: str, account: str, blob_id: str) -> None:
        info = self.blobs.get((account, blob_id))
        if info is not None:
            info.holders.discard(provider_id)

    def release_scattered(self, session_id: str, account: str, blob_id: str) -> None:
        """A session drops its scattered future; once none holds one, holders free it and the
        gateway forgets it (a task that still names it gets it from its client again)."""
        info = self.blobs.get((account, blob_id))
        if info is None:
            return
        info.scattered.discard(session_id)
        if not info.scattered:
            self.forget(info)

    def let_go(self, account: str, blob_ids: list[str], provider_id: str) -> None:
        """``provider_id`` may free these blobs (a result's, delivered): it is told so, and
        the gateway forgets each one nobody holds a scattered future for."""
        self.send(("p", provider_id), p.encode(p.Drop(
            blobs=[store_key(account, bid) for bid in blob_ids])))
        for bid in blob_ids:
            info = self.blobs.get((account, bid))
            if info is not None:
                info.holders.discard(provider_id)
                if not info.scattered and not info.holders:
                    del self.blobs[(account, bid)]

    def forget(self, info: BlobInfo) -> None:
        """Holders free the blob; transfers of it stop."""
        for x in [x for x, t in self.transfers.items() if t.blob is info]:
            self._fail(self.transfers[x], "the blob is no longer needed", None)
        for holder in info.holders:
            self.send(("p", holder), p.encode(p.Drop(blobs=[store_key(info.account, info.id)])))
        info.holders.clear()
        self.blobs.pop((info.account, info.id), None)

    # ------------------------------------------------------------------ transfers

    def start(self, info: BlobInfo, source: Peer, dests: set[Peer],
              purpose: tuple[str, str]) -> Transfer | None:
        """Ask ``source`` for the blob and relay it to ``dests``; None if the source is gone."""
        t = Transfer(next(self._ids), info, source, set(dests), purpose=purpose)
        if source[0] == "p" and is_content_id(info.id):
            t.hasher = hashlib.sha256()  # an untrusted sender: its bytes must match their name
        owner = info.account if source[0] == "p" else ""
        if not self.send(source, p.transient(p.encode(p.Want(x=t.x, blob=info.id, owner=owner)))):
            return None
        self.transfers[t.x] = t
        for kind, peer in dests:
            if kind == "p":
                self.inbound[(peer, info.account, info.id)] = t.x
        if not info.size:
            self._finish(t)
        return t

    def to_provider(self, info: BlobInfo, provider_id: str, client: str | None,
                    purpose: tuple[str, str]) -> str | None:
        """Get the blob onto ``provider_id`` (unless it holds it or it is on its way): from
        another holder (content-named blobs only), else from the ``client`` session that owns
        it. An error string if no source is left."""
        if provider_id in info.holders or (provider_id, info.account, info.id) in self.inbound:
            return None
        sources: list[Peer] = []
        if is_content_id(info.id):
            sources += [("p", h) for h in sorted(info.holders)]
        if client is not None:
            sources.append(("c", client))
        for source in sources:
            if self.start(info, source, {("p", provider_id)}, purpose) is not None:
                return None
        return (f"the data {info.id[:12]}… ({info.size} bytes) is held by no provider online "
                f"and its client is not connected to send it again")

    def chunk(self, sender: Peer, msg: p.Chunk, data: memoryview) -> list[Peer]:
        """A piece from a source: checked, forwarded to every destination. Returns the
        destinations (the shell waits for their writers to drain before reading on)."""
        t = self.transfers.get(msg.x)
        if t is None or t.source != sender:
            return []  # not (or no longer) this sender's transfer: dropped
        why = None
        if msg.offset != t.offset or msg.size != t.blob.size or msg.blob != t.blob.id:
            why = "a chunk out of order, or of another blob"
        elif not data.nbytes or data.nbytes > MAX_CHUNK or t.offset + data.nbytes > t.blob.size:
            why = "a chunk past the blob's size (or empty, or too big)"
        if why is not None:
            self._fail(t, f"{why}: the transfer stops", sender)
            return []
        if t.hasher is not None:
            t.hasher.update(data)
        t.offset += data.nbytes
        self.moved_bytes += data.nbytes
        for dest in list(t.dests):
            owner = t.blob.account if dest[0] == "p" else ""
            frame = p.transient(p.encode_parts(p.Chunk(
                x=t.x, blob=t.blob.id, size=t.blob.size, offset=msg.offset, owner=owner), [data]))
            if not self.send(dest, frame):
                self._drop_dest(t, dest)
        if t.offset == t.blob.size and t.x in self.transfers:
            self._finish(t)
        return sorted(t.dests)

    def abort(self, sender: Peer, msg: p.Abort) -> None:
        """A source cannot send (it lacks the blob), or a destination could not keep it."""
        t = self.transfers.get(msg.x)
        if t is None:
            return
        if t.source == sender:
            self._fail(t, f"the sender stopped: {msg.reason or 'no reason given'}", sender)
        elif sender in t.dests:
            t.dests.discard(sender)
            self._ended_for(t, sender, f"the receiver refused it: {msg.reason or '?'}")
            if not t.dests:
                self._cancel(t)

    def peer_gone(self, peer: Peer) -> None:
        """A connection closed: transfers from it fail; transfers to it lose that destination."""
        for t in list(self.transfers.values()):
            if t.source == peer:
                what = "client" if peer[0] == "c" else "provider"
                self._fail(t, f"the {what} sending it disconnected after {t.offset} of "
                              f"{t.blob.size} bytes", None)
            elif peer in t.dests:
                self._drop_dest(t, peer)
        if peer[0] == "p":
            for info in self.blobs.values():
                info.holders.discard(peer[1])

    # ------------------------------------------------------------------ endings

    def _drop_dest(self, t: Transfer, dest: Peer) -> None:
        t.dests.discard(dest)
        self._ended_for(t, dest, "the receiver disconnected")
        if not t.dests and t.x in self.transfers:
            self._cancel(t)

    def _ended_for(self, t: Transfer, dest: Peer, why: str) -> None:
        """One destination is out: the hub hears of it as a failed transfer to that peer."""
        if dest[0] == "p":
            self.inbound.pop((dest[1], t.blob.account, t.blob.id), None)
        self.ended.append(Ended(Transfer(t.x, t.blob, t.source, {dest}, t.offset,
                                         purpose=t.purpose), why, None))

    def _cancel(self, t: Transfer) -> None:
        """Nobody wants it any more: the source stops."""
        self._close(t)
        self.send(t.source, p.encode(p.Abort(x=t.x, reason="no receiver left")))

    def _finish(self, t: Transfer) -> None:
        self._close(t)
        if t.hasher is not None and "s" + t.hasher.hexdigest() != t.blob.id:
            self._tell_dests(t, "the bytes do not match their hash")
            self.ended.append(Ended(t, "the sender's bytes do not match the hash it named",
                                    t.source))
            return
        for kind, peer in t.dests:
            if kind == "p":
                t.blob.holders.add(peer)
        self.ended.append(Ended(t))

    def _fail(self, t: Transfer, why: str, culprit: Peer | None) -> None:
        self._close(t)
        self._tell_dests(t, why)
        if culprit != t.source:
            self.send(t.source, p.encode(p.Abort(x=t.x, reason=why[:1000])))
        self.ended.append(Ended(t, why, culprit))

    def _tell_dests(self, t: Transfer, why: str) -> None:
        for dest in t.dests:
            self.send(dest, p.encode(p.Abort(x=t.x, reason=why[:1000])))

    def _close(self, t: Transfer) -> None:
        self.transfers.pop(t.x, None)
        for kind, peer in t.dests:
            if kind == "p" and self.inbound.get((peer, t.blob.account, t.blob.id)) == t.x:
                del self.inbound[(peer, t.blob.account, t.blob.id)]

    def take_ended(self) -> list[Ended]:
        ended, self.ended = self.ended, []
        return ended
