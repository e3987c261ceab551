"""The decompute widget panel: connection, balance, providers to pick, task groups to watch.

This module owns what the notebook *shows* of a :class:`~notebook_ext.client.Client` live. The
panel is an ipywidgets ``VBox`` laid out for JupyterLab's ~300 px right sidebar (one line per
provider, two per task group, details on hover) and still good wide; its HTML comes from
:mod:`notebook_ext.panel_view`. ``show()`` opens it in the sidebar through ``sidecar`` when that is
installed, else inline. A background thread refreshes it about twice a second; it only asks the
client (whose own thread does the I/O) and sets widget values, so the kernel is never blocked,
and :meth:`Panel.close` stops it before the widgets go away. While the gateway is unreachable it
asks nothing, greys out what it last knew and disables its controls.

Checking providers sets ``client.default_providers``: the next ``submit``, ``map`` and
``%%decompute`` without ``providers=`` run only there. A group's cancel button cancels that
group's unfinished tasks. It must never decode a task's result: it reads futures' live
``status``, ``usage`` and ``cost`` only, and holds finished futures only weakly (a future nobody
else holds is released, as Dask's are).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from IPython.display import display

from notebook_ext import kernel_provider, panel_view
from notebook_ext.display import task_group
from notebook_ext.errors import DecomputeError

if TYPE_CHECKING:
    from notebook_ext.client import Client, ProviderInfo
    from notebook_ext.futures import Future

log = logging.getLogger(__name__)

#: Seconds between refreshes: fast enough to look live, slow enough to cost nothing.
REFRESH_SECONDS = 0.5
#: Task groups listed: every active one first, then the most recent finished ones, up to this.
GROUPS_SHOWN = 8
#: Groups remembered for the session's totals (older finished ones fold into the totals).
GROUPS_KEPT = 200
#: Load samples kept per provider for its sparkline.
HISTORY = 20
#: A finished task's cost may still be settled a moment later (a cancel's final charge): its
#: future is re-read this many seconds before its cost is folded into the group's total.
SETTLE_SECONDS = 15.0
#: Seconds a checked provider that went offline keeps its row and its place in
#: ``default_providers`` (it keeps its id when it reconnects); then it is unchecked.
OFFLINE_GRACE = 120.0
#: Unfinished futures of a group looked at per refresh (the oldest: the running ones).
SCAN = 2000
#: Recent tasks kept (weakly) for ``state()["tasks"]``.
RECENT_TASKS = 50
#: Errors a refresh may raise while the gateway is unreachable or has no ledger.
UNAVAILABLE = (DecomputeError, TimeoutError, ConnectionError, RuntimeError)


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


def client_status(client: Client) -> str:
    """``client.status`` (connecting, connected, reconnecting, lost, closed); derived from
    ``connected``/``closed`` for a client that predates it."""
    status = getattr(client, "status", None)
    if isinstance(status, str):
        return status
    if client.closed:
        return "closed"
    return "connected" if client.connected else "reconnecting"


def provider_view(info: ProviderInfo) -> panel_view.ProviderView:
    """A provider's row data; its load is its own task processes' (older gateways: a share of
    the host, scaled to its CPUs and memory)."""
    load = info.load or {}
    if "cpu" in load:
        cpu = float(load.get("cpu") or 0.0)
    else:
        cpu = float(load.get("cpu_percent") or 0.0) / 100 * info.cpus
    if "memory_bytes" in load:
        mem = float(load.get("memory_bytes") or 0.0)
    else:
        mem = float(load.get("memory_percent") or 0.0) / 100 * info.memory
    running = int(load.get("running", info.running) or 0)
    return panel_view.ProviderView(
        info.id, info.name, info.cpus, info.memory, info.gpus, dict(info.prices),
        dict(info.runtime), info.sandbox, info.reputation, running, cpu, mem, info.account,
        dict(info.packages), info.installs)


class ProviderRow:
    """One provider: a checkbox (send my tasks here) and one line of HTML."""

    def __init__(self, info: ProviderInfo, checked: bool, on_toggle: Any) -> None:
        self.id = info.id
        self.name = info.name
        self.check = widgets.Checkbox(value=checked, indent=False,
                                      layout=widgets.Layout(width="18px", flex="0 0 18px"))
        self.check.tooltip = f"send my next tasks to {info.name} (and the other checked ones)"
        self.check.observe(on_toggle, names="value")
        self.html = widgets.HTML(layout=widgets.Layout(flex="1 1 auto", min_width="0"))
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.view: panel_view.ProviderView | None = None
        self.offline_since: float | None = None
        self.box = widgets.HBox([self.check, self.html],
                                layout=widgets.Layout(width="100%", align_items="center"))
        self.update(info)

    def update(self, info: ProviderInfo) -> None:
        self.view = provider_view(info)
        self.name = info.name
        self.offline_since = None
        self.history.append(min(self.view.cpu_busy / max(info.cpus, 1), 1.0))
        self.html.value = panel_view.provider_html(self.view, self.history)

    def mark_offline(self, now: float) -> None:
        if self.offline_since is None and self.view is not None:
            self.offline_since = now
            self.html.value = panel_view.provider_html(self.view, self.history, offline=True)

    def close(self) -> None:
        self.box.close()
        self.check.close()
        self.html.close()

    def state(self) -> dict[str, Any]:
        v = self.view
        assert v is not None
        return {"id": self.id, "name": v.name, "checked": self.check.value, "cpus": v.cpus,
                "memory": v.memory, "prices": v.prices, "sandbox": v.sandbox,
                "reputation": v.reputation, "cpu_busy": v.cpu_busy,
                "memory_used": v.memory_used, "running": v.running,
                "online": self.offline_since is None,
                "load_history": list(self.history)}


class GroupRow:
    """One task group: its HTML and a cancel button for its unfinished tasks."""

    def __init__(self, name: str, on_cancel: Any) -> None:
        self.name = name
        self.html = widgets.HTML(layout=widgets.Layout(flex="1 1 auto", min_width="0"))
        self.cancel = widgets.Button(description="cancel", layout=widgets.Layout(
            width="auto", flex="0 0 auto"))
        self.cancel.tooltip = f"cancel the unfinished tasks of {name}"
        self.cancel.on_click(lambda _b: on_cancel(self.name))
        self.box = widgets.HBox([self.html, self.cancel],
                                layout=widgets.Layout(width="100%", align_items="center"))

    def update(self, view: panel_view.GroupView, online: bool) -> None:
        self.html.value = panel_view.group_html(view)
        self.cancel.disabled = not (online and view.active)
        self.cancel.layout.visibility = "visible" if view.active else "hidden"

    def close(self) -> None:
        for w in (self.box, self.html, self.cancel):
            w.close()


class Panel(widgets.VBox):
    """``Panel(client)``: the live decompute panel; ``panel.show()`` puts it on screen."""

    def __init__(self, client: Client, *, interval: float = REFRESH_SECONDS,
                 autostart: bool = True) -> None:
        self.client = client
        self.interval = interval
        self.tracker = TaskTracker.attach(client)
        self.status = "connecting"
        self.available: float | None = None
        self.held: float | None = None
        self.header = widgets.HTML()
        self.provider_rows: dict[str, ProviderRow] = {}
        self.providers_box = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.providers_box.add_class("dc-dim")
        self.group_rows: dict[str, GroupRow] = {}
        self.groups_box = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.groups_box.add_class("dc-dim")
        self.group_views: list[panel_view.GroupView] = []
        self.no_tasks = widgets.HTML("<div class='dc-empty'>no tasks yet</div>")
        self.footer = widgets.HTML()
        self.providing = widgets.HTML(layout=widgets.Layout(display="none"))
        self.close_button = widgets.Button(description="close panel",
                                           layout=widgets.Layout(width="auto"))
        self.close_button.on_click(lambda _b: self.close())
        # Checkbox writes made by refresh() must not count as clicks; clicks arrive on the
        # kernel's thread while refresh() runs on the panel's, so the flag is per thread.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._applied: set[str] = set()  # the default_providers the checkboxes show
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sidecar: Any = None
        super().__init__(children=[
            widgets.HTML(panel_view.CSS, layout=widgets.Layout(display="none")),
            self.header,
            widgets.HTML("<div class='dc-section' title='checked = where your next tasks run "
                         "(none checked: anywhere)'>providers</div>"),
            self.providers_box,
            widgets.HTML("<div class='dc-section'>tasks</div>"),
            self.groups_box, self.footer, self.providing, self.close_button,
        ], layout=widgets.Layout(width="100%"))
        self.add_class("dc-panel")
        self.refresh()
        if autostart:
            self.start()

    def __repr__(self) -> str:  # the text/plain fallback where widgets cannot render
        return (f"<decompute Panel {self.client.address} {self.status}: "
                f"{len(self.provider_rows)} providers, {self.tracker.submitted} tasks>")

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        """Refresh in the background; the thread inherits this cell's output context."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), daemon=True,
                                        name="decompute-panel")
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval * (1 + min(failures, 10))):
            try:
                self.refresh()
                failures = 0
            except Exception:  # a refresh bug must not kill the panel; back off and say so
                failures += 1
                log.exception("decompute panel refresh failed")

    @property
    def updating(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop refreshing, then close the widgets (and the sidebar tab, if any)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for row in [*self.provider_rows.values(), *self.group_rows.values()]:
            row.close()
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None
        super().close()

    def show(self, where: str = "auto") -> str:
        """Display the panel: ``"sidecar"`` (JupyterLab's right sidebar), ``"inline"`` or
        ``"auto"`` (the sidebar when ``sidecar`` is installed and this is not VS Code, which
        cannot show it). Returns where it went."""
        if where not in ("auto", "sidecar", "inline"):
            raise ValueError("where must be 'auto', 'sidecar' or 'inline'")
        if where != "inline" and not (where == "auto" and os.environ.get("VSCODE_PID")):
            try:
                from sidecar import Sidecar
            except ImportError:
                if where == "sidecar":
                    raise
            else:
                self._sidecar = Sidecar(title="decompute", anchor="right")
                with self._sidecar:
                    display(self)
                return "sidecar"
        display(self)
        return "inline"

    # ------------------------------------------------------------------ refreshing

    def refresh(self) -> None:
        """One update of every field from the client (called by the thread; safe to call)."""
        if self._stop.is_set():
            return
        self.status = client_status(self.client)
        online = self.status == "connected"
        if online:
            self._refresh_providers()
            self._refresh_balance()
        for row in self.provider_rows.values():
            row.check.disabled = not online
        (self.remove_class if online else self.add_class)("dc-off")
        self.header.value = panel_view.header_html(
            self.status, self.client.address, getattr(self.client, "account", ""),
            self.available, self.held,
            "" if online else "showing what was last known; retrying in the background")
        self._refresh_groups(online)
        self._refresh_providing()

    def _refresh_balance(self) -> None:
        try:
            balance = self.client.balance()
        except UNAVAILABLE:
            return  # no ledger on this gateway, or it went away: keep what was last known
        self.available = float(getattr(balance, "available", balance))
        held = getattr(balance, "held", None)
        self.held = None if held is None else float(held)

    def _refresh_providers(self) -> None:
        try:
            infos = self.client.providers()
        except UNAVAILABLE as exc:
            log.debug("panel: providers unavailable: %s", exc)
            return
        with self._lock:
            chosen = set(self.client.default_providers or ())
            external = chosen != self._applied  # set in code, not by a click: show it
            seen = {info.id for info in infos}
            before = set(self.provider_rows)
            dropped = self._drop_or_keep_offline(seen, time.monotonic())
            self._local.syncing = True
            try:
                for info in infos:
                    row = self.provider_rows.get(info.id)
                    if row is None:
                        row = self.provider_rows[info.id] = ProviderRow(
                            info, info.id in chosen, self._toggled)
                    else:
                        row.update(info)
                    if external:
                        row.check.value = info.id in chosen
            finally:
                self._local.syncing = False
            self._applied = chosen
        if set(self.provider_rows) != before:
            rows = sorted(self.provider_rows.values(), key=lambda r: (r.name, r.id))
            self.providers_box.children = [r.box for r in rows] or [
                widgets.HTML("<div class='dc-empty'>no providers online</div>")]
        if dropped & chosen:  # a checked provider stayed away: stop sending tasks to a ghost
            self._toggled(None)

    def _drop_or_keep_offline(self, seen: set[str], now: float) -> set[str]:
        """Rows of providers that left: a checked one stays (marked offline, still chosen) for
        ``OFFLINE_GRACE`` seconds, since a provider that reconnects keeps its id; the others
        go. Returns the ids dropped."""
        dropped = set()
        for pid in set(self.provider_rows) - seen:
            row = self.provider_rows[pid]
            row.mark_offline(now)
            if not row.check.value or now - (row.offline_since or now) > OFFLINE_GRACE:
                self.provider_rows.pop(pid).close()
                dropped.add(pid)
        return dropped

    def _toggled(self, _change: Any) -> None:
        if getattr(self._local, "syncing", False):
            return
        with self._lock:
            picked = self.selected
            self.client.default_providers = picked or None
            self._applied = set(picked)

    @property
    def selected(self) -> list[str]:
        """Ids of the checked providers."""
        return [pid for pid, row in self.provider_rows.items() if row.check.value]

    def cancel_group(self, name: str) -> int:
        """Cancel the unfinished tasks of group ``name`` (the cancel button); returns how many."""
        futures = self.tracker.unfinished(name)
        if futures:
            self.client.cancel(futures)
        log.info("panel: cancelled %d tasks of %s", len(futures), name)
        return len(futures)

    def _refresh_groups(self, online: bool) -> None:
        views = self.tracker.views()
        self.group_views = views
        shown = views[:max(GROUPS_SHOWN, sum(v.active for v in views))]
        for view in shown:
            row = self.group_rows.get(view.name)
            if row is None:
                row = self.group_rows[view.name] = GroupRow(view.name, self.cancel_group)
            row.update(view, online)
        names = [v.name for v in shown]
        for gone in set(self.group_rows) - set(names):
            self.group_rows.pop(gone).close()
        children = [self.group_rows[n].box for n in names] or [self.no_tasks]
        if list(self.groups_box.children) != children:
            self.groups_box.children = children
        self.footer.value = panel_view.footer_html(
            self.tracker.submitted, self.tracker.tokens_spent(), len(views) - len(shown))

    def _refresh_providing(self) -> None:
        kp = kernel_provider.current()
        if kp is None:
            self.providing.layout.display = "none"
            self.providing.value = ""
            return
        self.providing.value = panel_view.providing_html(kp.stats())
        self.providing.layout.display = ""

    def state(self) -> dict[str, Any]:
        """What the panel shows now, as plain data (for tests, and for scripts to read)."""
        kp = kernel_provider.current()
        return {
            "gateway": self.client.address, "status": self.status,
            "account": getattr(self.client, "account", ""),
            "balance": {"available": self.available, "held": self.held},
            "providers": [row.state() for row in self.provider_rows.values()],
            "selected": self.selected,
            "groups": [{"group": v.name, "done": v.done, "total": v.total, "errors": v.failed,
                        "cancelled": v.cancelled, "running": v.running, "cost": v.cost,
                        "status": v.status} for v in self.group_views],
            "tasks": self.tracker.recent_tasks(),
            "totals": {"tasks": self.tracker.submitted, "tokens": self.tracker.tokens_spent()},
            "providing": kp.stats() if kp is not None else None,
            "providing_shown": self.providing.layout.display != "none",
            "updating": self.updating,
            "greyed": "dc-off" in self._dom_classes,
        }
