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
else holds is released, as Dask's are). That task memory (:class:`TaskTracker`: counts, costs
and providers by task group) lives in :mod:`notebook_ext.panel_state`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from IPython.display import display

from notebook_ext import kernel_provider, panel_view
from notebook_ext.errors import DecomputeError
from notebook_ext.panel_state import GROUPS_KEPT as GROUPS_KEPT
from notebook_ext.panel_state import RECENT_TASKS as RECENT_TASKS
from notebook_ext.panel_state import SCAN as SCAN
from notebook_ext.panel_state import SETTLE_SECONDS as SETTLE_SECONDS
from notebook_ext.panel_state import TaskGroup as TaskGroup
from notebook_ext.panel_state import TaskTracker as TaskTracker
from notebook_ext.panel_state import is_graph_key as is_graph_key

if TYPE_CHECKING:
    from notebook_ext.client import Client, ProviderInfo

log = logging.getLogger(__name__)

#: Seconds between refreshes: fast enough to look live, slow enough to cost nothing.
REFRESH_SECONDS = 0.5
#: Task groups listed: every active one first, then the most recent finished ones, up to this.
GROUPS_SHOWN = 8
#: Load samples kept per provider for its sparkline.
HISTORY = 20
#: Seconds a checked provider that went offline keeps its row and its place in
#: ``default_providers`` (it keeps its id when it reconnects); then it is unchecked.
OFFLINE_GRACE = 120.0
#: Errors a refresh may raise while the gateway is unreachable or has no ledger.
UNAVAILABLE = (DecomputeError, TimeoutError, ConnectionError, RuntimeError)


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
