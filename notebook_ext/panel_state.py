"""The panel's task memory: every future a client makes, counted by task group.

This module owns the *state* the decompute panel keeps about tasks (counts, costs, providers seen
per group, recent tasks), apart from the widgets that show it (:mod:`notebook_ext.panel`) and the
HTML they render (:mod:`notebook_ext.panel_view`). It is split out because it is plain data with
its own locking and weak-reference rules, testable without ipywidgets, and shared by every panel
and the magics of one client. It never decodes a task's result: it reads futures' live
``status``, ``usage`` and ``cost`` only, and holds finished futures only weakly.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from notebook_ext import panel_view
from notebook_ext.display import task_group

if TYPE_CHECKING:
    from notebook_ext.client import Client
    from notebook_ext.futures import Future


#: Groups remembered for the session's totals (older finished ones fold into the totals).
GROUPS_KEPT = 200
#: A finished task's cost may still be settled a moment later (a cancel's final charge): its
#: future is re-read this many seconds before its cost is folded into the group's total.
SETTLE_SECONDS = 15.0
#: Unfinished futures of a group looked at per refresh (the oldest: the running ones).
SCAN = 2000
#: Recent tasks kept (weakly) for ``state()["tasks"]``.
RECENT_TASKS = 50


@dataclass(slots=True)
class TaskGroup:
    """One key prefix's tasks (``square``, ``sum-aggregate``, ``In[18]``): counts and cost.

    Unfinished futures are held weakly, oldest first (the client holds them while they run; one
    nobody holds is released); a finished one leaves only its counts and cost behind. Only the
    oldest ``SCAN`` unfinished ones are looked at per refresh: tasks start in submission order,
    so those are the running ones, and a 100,000-task map costs a refresh no more than 2,000.
    """

    name: str
    started: float
    total: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    settled_cost: float = 0.0
    cpu_seconds: float = 0.0
    ended: float | None = None
    providers: dict[str, None] = field(default_factory=dict)
    live: dict[int, weakref.ref] = field(default_factory=dict)  # id(future) -> future
    settling: deque = field(default_factory=deque)  # (ended at, weakref, cost then)
    callback: Any = None  # the done callback that counts a future of this group

    @property
    def done(self) -> int:
        return self.finished + self.failed + self.cancelled

    def oldest_unfinished(self) -> list[Future]:
        out = []
        for ref in itertools.islice(self.live.values(), SCAN):
            fut = ref()
            if fut is not None and not fut.done():
                out.append(fut)
        return out

    def fold_settled(self, now: float) -> None:
        """Move costs of cancels old enough into ``settled_cost`` (a cancel's final charge
        may arrive a moment after the future was cancelled here)."""
        while self.settling and now - self.settling[0][0] > SETTLE_SECONDS:
            _, ref, cost = self.settling.popleft()
            fut = ref()
            self.settled_cost += fut.cost if fut is not None else cost

    def view(self, now: float) -> panel_view.GroupView:
        """What the row shows."""
        live = self.oldest_unfinished()
        running = [f for f in live if f.status == "running"]
        for f in running:
            if f.provider:
                self.providers.setdefault(f.provider)
        settling = sum((ref() or _Gone(cost)).cost for _, ref, cost in self.settling)
        cost = self.settled_cost + settling + sum(f.cost or 0.0 for f in running)
        cpu = self.cpu_seconds + sum(float(f.usage.get("cpu_seconds", 0.0)) for f in running)
        return panel_view.GroupView(
            self.name, self.total, self.finished, self.failed, self.cancelled, len(running),
            cost, cpu, (self.ended or now) - self.started, tuple(self.providers))


class _Ref(weakref.ref):
    """A weak reference to a tracked future that, when the future is collected unfinished,
    queues itself for :meth:`TaskTracker._reap`."""

    __slots__ = ("fid", "group")

    def __new__(cls, fut: Future, dead: deque, group: TaskGroup) -> _Ref:
        return super().__new__(cls, fut, dead.append)

    def __init__(self, fut: Future, dead: deque, group: TaskGroup) -> None:
        super().__init__(fut, dead.append)
        self.fid = id(fut)
        self.group = group


@dataclass(frozen=True, slots=True)
class _Gone:
    """Stands in for a collected future whose cost was read when it ended."""

    cost: float


class TaskTracker:
    """Every future one client creates, by task group: the panel's task memory.

    The client keeps only unfinished futures, so a task that starts and ends between two refreshes
    would never be seen; the tracker registers with ``client.on_submit`` to see each batch as it
    is made and counts endings in done callbacks (which run on the client's thread, hence the
    lock). One tracker per client, shared by all its panels and the magics.
    """

    def __init__(self, client: Client) -> None:
        self._lock = threading.Lock()
        self._client = client
        self.groups: dict[str, TaskGroup] = {}
        self.submitted = 0
        self._evicted_cost = 0.0
        self.recent: deque[weakref.ref] = deque(maxlen=RECENT_TASKS)
        # A Dask graph's inner futures are dropped by ``compute`` as soon as it has submitted
        # them; their tasks still run (graph tasks are released, never cancelled, when
        # collected), so hold them until they end, or their group would never count them.
        self._graph_tasks: set[Future] = set()
        self._dead: deque[_Ref] = deque()
        client.on_submit(self.add)
        # tasks submitted before the panel was opened
        book = getattr(client, "_book", None)
        earlier = book.futures() if book is not None and hasattr(book, "futures") else list(
            getattr(client, "_futures", {}).copy().values())
        self.add([f for f in earlier if not f.done()])

    @classmethod
    def attach(cls, client: Client) -> TaskTracker:
        tracker = getattr(client, "_decompute_tracker", None)
        if tracker is None:
            tracker = cls(client)
            client._decompute_tracker = tracker  # type: ignore[attr-defined]
        return tracker

    def add(self, futures: list[Future]) -> None:
        """Count a batch of new futures into their groups (``client.on_submit`` calls this on
        the submitting thread; a 100,000-task map passes here once, so keep the loop lean)."""
        now = time.monotonic()
        added: list[tuple[Future, TaskGroup]] = []
        prefix, group = None, None
        with self._lock:
            self._reap()
            for fut in futures:
                key = fut.key
                graph = is_graph_key(key)
                # a map's keys share "name-<token>-": name its group once per batch
                head = None if graph else key.rpartition("-")[0]
                if head is None or head != prefix or group is None:
                    group = self._group(task_group(key), now)
                    prefix = head
                if id(fut) in group.live:
                    continue
                group.total += 1
                group.live[id(fut)] = _Ref(fut, self._dead, group)
                if graph:
                    self._graph_tasks.add(fut)
                added.append((fut, group))
            self.submitted += len(added)
            self.recent.extend(weakref.ref(f) for f, _ in added[-RECENT_TASKS:])
            self._evict()
        for fut, grp in added:  # outside the lock: a done future calls back at once
            fut.add_done_callback(grp.callback)

    def _group(self, name: str, now: float) -> TaskGroup:
        """Group ``name``, made the most recent one (a new batch of an ended group restarts
        its clock)."""
        group = self.groups.pop(name, None)
        if group is None:
            group = TaskGroup(name, now)
            group.callback = functools.partial(self._ended, group)
        elif group.ended is not None:
            group.started, group.ended = now, None
        self.groups[name] = group
        return group

    def _reap(self) -> None:
        """Count the futures collected unfinished as cancelled (caller holds the lock): the
        client released (cancelled) their tasks. The garbage collector may run on any thread,
        even one holding the lock, so a collected future's weak reference only queues itself
        (``deque.append`` is atomic) and is counted here."""
        while self._dead:
            ref = self._dead.popleft()
            group, fid = ref.group, ref.fid
            if group.live.pop(fid, None) is not None:
                group.cancelled += 1
                if group.done >= group.total:
                    group.ended = time.monotonic()

    def _ended(self, group: TaskGroup, fut: Future) -> None:
        """A future of ``group`` ended (done callback, on whichever thread ended it)."""
        with self._lock:
            if group.live.pop(id(fut), None) is None:
                return
            cost = fut.cost or 0.0
            if fut.cancelled():
                group.cancelled += 1
                group.settling.append((time.monotonic(), weakref.ref(fut), cost))
            else:
                group.failed += fut.exception() is not None
                group.finished += fut.exception() is None
                group.settled_cost += cost
            group.cpu_seconds += float(fut.usage.get("cpu_seconds", 0.0))
            if fut.provider:
                group.providers.setdefault(fut.provider)
            self._graph_tasks.discard(fut)
            if group.done >= group.total:
                group.ended = time.monotonic()

    def _evict(self) -> None:
        while len(self.groups) > GROUPS_KEPT:
            name = next((n for n, g in self.groups.items() if g.done >= g.total), None)
            if name is None:
                return
            old = self.groups.pop(name)
            self._evicted_cost += old.settled_cost + sum(c for _, _, c in old.settling)

    def views(self) -> list[panel_view.GroupView]:
        """Every group, active ones first, each part newest first."""
        now = time.monotonic()
        with self._lock:
            self._reap()
            groups = list(self.groups.values())
            for g in groups:
                g.fold_settled(now)
            views = [g.view(now) for g in reversed(groups)]
        return [v for v in views if v.active] + [v for v in views if not v.active]

    def unfinished(self, name: str) -> list[Future]:
        """Every unfinished future of group ``name`` still held anywhere (for its cancel)."""
        with self._lock:
            group = self.groups.get(name)
            refs = list(group.live.values()) if group is not None else []
        return [f for f in (r() for r in refs) if f is not None and not f.done()]

    def tokens_spent(self) -> float:
        with self._lock:
            groups = list(self.groups.values())
            return self._evicted_cost + sum(
                g.settled_cost + sum((r() or _Gone(c)).cost for _, r, c in g.settling)
                for g in groups)

    def recent_tasks(self) -> list[dict[str, Any]]:
        """The latest tasks still referenced anywhere, newest first (plain data)."""
        rows = []
        for ref in reversed(list(self.recent)):
            fut = ref()
            if fut is None:
                continue
            rows.append({"key": fut.key, "group": task_group(fut.key), "status": fut.status,
                         "provider": fut.provider or "",
                         "cpu_seconds": round(float(fut.usage.get("cpu_seconds", 0.0)), 3),
                         "cost": float(fut.cost or 0.0)})
        return rows


def is_graph_key(key: str) -> bool:
    """A Dask graph task's wire key (``<key JSON>#<token>``, see ``dask_integration``)."""
    return "#" in key and key[:1] in "[\"~"
