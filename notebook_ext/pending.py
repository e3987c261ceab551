"""The client's books of tasks in flight, shared by the user's thread and the client's loop thread.

Owns: which keys are unfinished, their futures, what it takes to submit each again after a
gateway restart, and the waiters for query replies and fetched results. Every read and write
takes one lock, so the user's thread (submitting, closing) and the loop thread (results) never
see a dict change under an iteration; callers get snapshots, never the dicts themselves.

A chunk of a ``map`` is one task here (its key, spec and payload), held as its
:class:`~notebook_ext.futures.Chunk`, which passes what arrives on to its items' futures.

Futures are held *weakly*, as Dask does: a task whose future nobody holds any more is abandoned
(``on_abandoned(key, keep)``: the client cancels it). What the books hold strongly is the
submission itself (spec, argument bytes, function blob), until the task's result arrives.
A weakref callback runs wherever the garbage collector happens to run, even inside one of these
methods on the same thread, so it takes no lock and changes no dict: it queues the key and asks
for :meth:`reap` (``wake``), which forgets it under the lock.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway import protocol as p
from notebook_ext.futures import Chunk, Future

#: What the books hold per task: its future, or the chunk whose items' futures it answers.
Tracked = Future | Chunk


@dataclass(slots=True)
class _Entry:
    spec: p.TaskSpec
    payload: list | None  # None for graph tasks: they are not resubmitted alone
    func: tuple[str, bytes]
    ref: weakref.ref


@dataclass(frozen=True, slots=True)
class Resubmission:
    """Tasks to submit again, and the function blobs they need."""

    specs: list[p.TaskSpec]
    payloads: list[list]
    funcs: dict[str, bytes]


class TaskBook:
    """Unfinished tasks by key, plus reply and fetch waiters; thread-safe."""

    def __init__(self, on_abandoned: Callable[[str, bool], None],
                 wake: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._replies: dict[int, cf.Future] = {}
        self._fetches: dict[str, cf.Future] = {}
        self._on_abandoned = on_abandoned
        self._wake = wake
        self._dead: deque[tuple[str, weakref.ref, bool]] = deque()
        self._reap_asked = False

    # ------------------------------------------------------------------ tasks

    def add(self, futures: list[Tracked], specs: list[p.TaskSpec], payloads: list[list],
            funcs: dict[str, bytes]) -> None:
        """Record a batch; ValueError (nothing recorded) if a key is still in flight."""
        with self._lock:
            for spec in specs:
                entry = self._entries.get(spec.key)
                if entry is not None and entry.ref() is not None:
                    raise ValueError(f"key {spec.key!r} is already in use by a running task; "
                                     f"pass another key= or wait for that task")
            for fut, spec, payload in zip(futures, specs, payloads, strict=True):
                keep = bool(spec.keep)
                self._entries[spec.key] = _Entry(
                    spec, None if keep else payload, (spec.func, funcs[spec.func]),
                    weakref.ref(fut, self._collected(spec.key, keep)))

    def _collected(self, key: str, keep: bool) -> Callable[[weakref.ref], None]:
        def collected(ref: weakref.ref) -> None:  # runs wherever the GC ran: no lock here
            self._dead.append((key, ref, keep))
            if not self._reap_asked:
                self._reap_asked = True
                self._wake()

        return collected

    def reap(self) -> None:
        """Forget the tasks whose futures were collected, and report them abandoned."""
        self._reap_asked = False
        gone = []
        with self._lock:
            while self._dead:
                key, ref, keep = self._dead.popleft()
                entry = self._entries.get(key)
                if entry is not None and entry.ref is ref:
                    del self._entries[key]
                    gone.append((key, keep))
        for key, keep in gone:
            self._on_abandoned(key, keep)

    def get(self, key: str) -> Tracked | None:
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry.ref()

    def take(self, key: str) -> Tracked | None:
        """The task ended: forget it; its future, if someone still holds it."""
        with self._lock:
            entry = self._entries.pop(key, None)
        return None if entry is None else entry.ref()

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def futures(self) -> list[Future]:
        """The futures of unfinished tasks (a chunk's: its items still held)."""
        with self._lock:
            refs = [e.ref for e in self._entries.values()]
        out: list[Future] = []
        for f in (r() for r in refs):
            if isinstance(f, Chunk):
                out += f.live()
            elif f is not None:
                out.append(f)
        return out

    def take_all(self) -> list[Tracked]:
        """Forget every task (the client closes); their futures that are still held."""
        with self._lock:
            entries, self._entries = self._entries, {}
        return [f for f in (e.ref() for e in entries.values()) if f is not None]

    def resubmission(self, keys: Iterable[str]) -> tuple[Resubmission, list[str]]:
        """What to submit again for ``keys`` the gateway does not know, and the keys that
        cannot be (graph tasks: their inputs lived on the lost gateway's books)."""
        specs, payloads, funcs, lost = [], [], {}, []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry.payload is None:
                    lost.append(key)
                    continue
                specs.append(entry.spec)
                payloads.append(entry.payload)
                funcs[entry.func[0]] = entry.func[1]
        return Resubmission(specs, payloads, funcs), lost

    # ------------------------------------------------------------------ replies and fetches

    def expect_reply(self, req_id: int) -> cf.Future:
        reply: cf.Future = cf.Future()
        with self._lock:
            self._replies[req_id] = reply
        return reply

    def reply(self, req_id: int) -> cf.Future | None:
        with self._lock:
            return self._replies.pop(req_id, None)

    def drop_reply(self, req_id: int) -> None:
        with self._lock:
            self._replies.pop(req_id, None)

    def fetch_waiter(self, key: str) -> tuple[cf.Future, bool]:
        """The waiter for a kept result's bytes, and whether a fetch must be sent for it."""
        with self._lock:
            waiter = self._fetches.get(key)
            if waiter is not None and not (waiter.done() and waiter.exception() is not None):
                return waiter, False
            waiter = self._fetches[key] = cf.Future()
            return waiter, True

    def fetched(self, key: str) -> cf.Future | None:
        with self._lock:
            waiter = self._fetches.get(key)
        return waiter if waiter is not None and not waiter.done() else None

    def fail_waiters(self, exc: BaseException) -> None:
        """Nobody will answer any more (the client closes): wake every waiter."""
        with self._lock:
            waiters = [*self._replies.values(), *self._fetches.values()]
            self._replies.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)


class LetGo:
    """Keys to release (kept results nobody needs) or cancel (tasks nobody waits for), sent
    in batches: a Dask graph drops thousands of intermediate futures at once, and one message
    each would hit the gateway's rate limit. ``add`` may run in a GC callback on any thread
    (hence the re-entrant lock); ``take`` runs on the loop thread and empties the queues."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._releases: list[str] = []
        self._cancels: list[str] = []
        self._asked = False
        self._wake = wake

    def add(self, key: str, *, release: bool) -> None:
        with self._lock:
            (self._releases if release else self._cancels).append(key)
            if self._asked:
                return
            self._asked = True
        self._wake()

    def take(self) -> tuple[list[str], list[str]]:
        """``(releases, cancels)`` queued so far."""
        with self._lock:
            releases, self._releases = self._releases, []
            cancels, self._cancels = self._cancels, []
            self._asked = False
        return releases, cancels


class FirstFailures:
    """The first failure of each graph submission (keys ``...#token``), for the last 256.

    A graph's intermediate futures are dropped as soon as it is submitted; when one fails (or is
    refused) its dependents only hear that an input is missing. This tells the real cause."""

    LIMIT = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: dict[str, tuple[str, BaseException]] = {}

    def note(self, token: str, key: str, exc: BaseException) -> None:
        with self._lock:
            if token not in self._first:
                self._first[token] = (key, exc)
                while len(self._first) > self.LIMIT:
                    self._first.pop(next(iter(self._first)))

    def get(self, token: str) -> tuple[str, BaseException] | None:
        with self._lock:
            return self._first.get(token)
