"""The decompute widget panel: providers to pick, tasks running, tokens spent and earned.

This module owns what the notebook *shows* of a :class:`~notebook_ext.client.Client`. The panel
is an ipywidgets ``VBox``; ``show()`` opens it in JupyterLab's right sidebar through ``sidecar``
when that is installed, else inline. A background thread refreshes it about twice a second; it
only ever asks the client (whose own thread does the I/O) and sets widget values, so the kernel
is never blocked, and :meth:`Panel.close` stops it before the widgets go away.

Checking providers sets ``client.default_providers``: the next ``submit``, ``map`` and
``%%decompute`` without ``providers=`` run only there. It must never decode a task's result: it
reads futures' live ``status``, ``usage`` and ``cost`` only.
"""

from __future__ import annotations

import contextvars
import html
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from IPython.display import display

from notebook_ext import kernel_provider
from notebook_ext.display import format_bytes, format_prices, format_runtime, task_html
from notebook_ext.errors import DecomputeError
from notebook_ext.progress import ProgressState

if TYPE_CHECKING:
    from notebook_ext.client import Client, ProviderInfo
    from notebook_ext.futures import Future

log = logging.getLogger(__name__)

#: Seconds between refreshes: fast enough to look live, slow enough to cost nothing.
REFRESH_SECONDS = 0.5
#: Finished tasks listed under the running ones.
RECENT_SHOWN = 8
COLUMNS = ("provider", "CPUs", "memory", "GPUs", "prices", "runtime", "sandbox", "reputation",
           "CPU %", "memory %")
NO_VALUE = "—"


@dataclass(slots=True)
class TaskRecord:
    future: Future
    submitted: float
    ended: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.submitted


class TaskTracker:
    """Every future one client creates, with submit and end times: the panel's task memory.

    The client keeps only unfinished futures, so a task that starts and ends between two refreshes
    would never be seen; the tracker wraps the client's batch sender (on the instance) to see each
    future as it is made. One tracker per client, shared by all its panels and the magics.
    """

    KEEP = 500

    def __init__(self, client: Client) -> None:
        self._lock = threading.Lock()
        self.records: deque[TaskRecord] = deque()
        self.submitted = 0
        self._evicted_cost = 0.0
        self._client = client
        self._known: set[int] = set()  # id() of the futures in ``records``
        client.on_submit(self._add)

    @classmethod
    def attach(cls, client: Client) -> TaskTracker:
        tracker = getattr(client, "_decompute_tracker", None)
        if tracker is None:
            tracker = cls(client)
            client._decompute_tracker = tracker  # type: ignore[attr-defined]
        return tracker

    def _add(self, futures: list[Future]) -> None:
        now = time.monotonic()
        with self._lock:
            for fut in futures:
                if id(fut) in self._known:
                    continue
                self._known.add(id(fut))
                record = TaskRecord(fut, now)
                self.records.append(record)
                self.submitted += 1
                fut.add_done_callback(lambda _f, r=record: setattr(r, "ended", time.monotonic()))
            while len(self.records) > self.KEEP and self.records[0].future.done():
                old = self.records.popleft().future
                self._known.discard(id(old))
                self._evicted_cost += old.cost

    def snapshot(self) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """(running, the most recent finished), newest first."""
        # anything submitted past the hook; dict.copy() is atomic, iterating a live dict is not
        self._add(list(getattr(self._client, "_futures", {}).copy().values()))
        with self._lock:
            records = list(self.records)
        running = [r for r in reversed(records) if not r.future.done()]
        done = [r for r in reversed(records) if r.future.done()][:RECENT_SHOWN]
        return running, done

    def tokens_spent(self) -> float:
        with self._lock:
            return self._evicted_cost + sum(r.future.cost or 0.0 for r in self.records)


class ProviderRow:
    """One provider's widgets: a checkbox with its name, its offer, live CPU and memory bars."""

    def __init__(self, info: ProviderInfo, checked: bool, on_toggle: Any) -> None:
        self.id = info.id
        self.check = widgets.Checkbox(value=checked, description=info.name, indent=False,
                                      layout=widgets.Layout(width="auto"))
        self.check.observe(on_toggle, names="value")
        self.cells = {k: widgets.Label() for k in COLUMNS[1:8]}
        self.cpu = widgets.FloatProgress(min=0, max=100, layout=widgets.Layout(width="90px"))
        self.memory = widgets.FloatProgress(min=0, max=100, layout=widgets.Layout(width="90px"))
        self.update(info)

    def update(self, info: ProviderInfo) -> None:
        values = (str(info.cpus), format_bytes(info.memory), str(info.gpus),
                  format_prices(info.prices), format_runtime(info.runtime), info.sandbox,
                  f"{info.reputation:.2f}")
        for cell, value in zip(self.cells.values(), values, strict=True):
            cell.value = value
        self.cpu.value = float(info.load.get("cpu_percent", 0.0))
        self.memory.value = float(info.load.get("memory_percent", 0.0))
        self.check.tooltip = f"{info.id} · {info.running} running · account {info.account[:12]}"

    @property
    def children(self) -> list[widgets.Widget]:
        return [self.check, *self.cells.values(), self.cpu, self.memory]

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.check.description, "checked": self.check.value,
                **{k: c.value for k, c in self.cells.items()},
                "cpu_percent": self.cpu.value, "memory_percent": self.memory.value}


#: Multi-task submissions whose progress the panel shows (the latest ones).
PROGRESS_KEPT = 4


def progress_html(groups: list[Any]) -> str:
    """One bar per task group (key prefix): done of total, errors in red."""
    rows = []
    for g in groups[-12:]:
        width = int(100 * g.done / g.total) if g.total else 100
        colour = "#c0392b" if g.errors else "#2e86c1"
        rows.append(
            f"<div style='display:flex;gap:6px;align-items:center'>"
            f"<span style='width:130px;overflow:hidden'>{html.escape(g.name)}</span>"
            f"<span style='width:120px;background:#eee;height:9px'><span style='display:block;"
            f"width:{width}%;height:9px;background:{colour}'></span></span>"
            f"<span>{g.done}/{g.total}{f' ({g.errors} failed)' if g.errors else ''}</span></div>")
    return "<b>progress</b>" + "".join(rows) if rows else ""


class Panel(widgets.VBox):
    """``Panel(client)``: the live decompute panel; ``panel.show()`` puts it on screen."""

    def __init__(self, client: Client, *, interval: float = REFRESH_SECONDS,
                 autostart: bool = True) -> None:
        self.client = client
        self.interval = interval
        self.tracker = TaskTracker.attach(client)
        self.gateway = widgets.Label(client.address)
        self.connection = widgets.Label()
        self.account = widgets.Label(f"{client.account[:8]}…{client.account[-4:]}")
        self.account.tooltip = client.account  # the sidebar is narrow: full id on hover
        self.balance = widgets.Label(NO_VALUE)
        self.provider_rows: dict[str, ProviderRow] = {}
        self.provider_grid = widgets.GridBox(layout=widgets.Layout(
            grid_template_columns=f"minmax(120px, auto) repeat({len(COLUMNS) - 3}, auto) 90px 90px",
            grid_gap="2px 12px", overflow="auto"))  # scrolls sideways in a narrow sidebar
        self.task_table = widgets.HTML()
        self.task_rows: list[dict[str, Any]] = []
        self.progress_html = widgets.HTML()  # per-prefix bars of maps and Dask graphs
        self.progress: deque[ProgressState] = deque(maxlen=PROGRESS_KEPT)
        client.on_submit(self._track_progress)
        self.task_count = widgets.Label("0")
        self.spent = widgets.Label("0")
        self.providing = widgets.HTML(layout=widgets.Layout(display="none"))
        self.close_button = widgets.Button(description="close panel", icon="times",
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
        header = widgets.HBox([widgets.HTML("<b>decompute</b>"), self.gateway, self.connection,
                               widgets.HTML("account"), self.account,
                               widgets.HTML("balance"), self.balance],
                              layout=widgets.Layout(flex_flow="row wrap", grid_gap="8px"))
        totals = widgets.HBox([widgets.HTML("<b>session</b> tasks"), self.task_count,
                               widgets.HTML("tokens spent"), self.spent],
                              layout=widgets.Layout(grid_gap="8px"))
        super().__init__(children=[
            header, widgets.HTML("<b>providers</b> (checked = where your tasks run)"),
            self.provider_grid, widgets.HTML("<b>tasks</b>"), self.task_table,
            self.progress_html, totals,
            self.providing, self.close_button,
        ])
        self.refresh()
        if autostart:
            self.start()

    def __repr__(self) -> str:  # the text/plain fallback where widgets cannot render
        return (f"<decompute Panel {self.gateway.value} {self.connection.value}: "
                f"{len(self.provider_rows)} providers, {self.task_count.value} tasks, "
                f"balance {self.balance.value}>")

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
        for row in self.provider_rows.values():
            for child in row.children:
                child.close()
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
        closed, online = self.client.closed, self.client.connected
        self.connection.value = "closed" if closed else ("● connected" if online
                                                          else "○ reconnecting")
        if online:
            self._refresh_providers()
            self.balance.value = self._balance()
        self._refresh_tasks()
        self._refresh_providing()

    def _balance(self) -> str:
        try:
            return f"{self.client.balance():.6f} tokens"
        except (DecomputeError, TimeoutError, ConnectionError, RuntimeError):
            return NO_VALUE  # no ledger on this gateway yet, or it is unreachable

    def _refresh_providers(self) -> None:
        try:
            infos = self.client.providers()
        except (DecomputeError, TimeoutError, ConnectionError, RuntimeError) as exc:
            log.debug("panel: providers unavailable: %s", exc)
            return
        with self._lock:
            chosen = set(self.client.default_providers or ())
            external = chosen != self._applied  # set in code, not by a click: show it
            seen = {info.id for info in infos}
            changed = seen != set(self.provider_rows)
            for gone in set(self.provider_rows) - seen:
                for child in self.provider_rows.pop(gone).children:
                    child.close()
            self._local.syncing = True
            try:
                for info in infos:
                    row = self.provider_rows.get(info.id)
                    if row is None:
                        row = self.provider_rows[info.id] = ProviderRow(
                            info, info.id in chosen, self._toggled)
                    row.update(info)
                    if external:
                        row.check.value = info.id in chosen
            finally:
                self._local.syncing = False
            self._applied = chosen
        if changed:
            head = [widgets.HTML(f"<b>{html.escape(c)}</b>") for c in COLUMNS]
            self.provider_grid.children = [*head, *(w for r in self.provider_rows.values()
                                                    for w in r.children)]
            if chosen - seen:  # a pinned provider left: stop sending tasks to a ghost
                self._toggled(None)

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

    def _track_progress(self, futures: list[Future]) -> None:
        """A batch of several tasks (a map, a Dask graph) gets progress bars by key prefix."""
        if len(futures) > 1:
            self.progress.append(ProgressState(list(futures)))

    def _refresh_progress(self) -> None:
        groups = [g for state in self.progress for g in state.groups.values()]
        self.progress_html.value = progress_html(groups)

    def _refresh_tasks(self) -> None:
        self._refresh_progress()
        running, recent = self.tracker.snapshot()
        rows = []
        for record in [*running, *recent]:
            fut = record.future
            rows.append({"key": fut.key, "status": fut.status, "provider": fut.provider or "",
                         "elapsed": round(record.elapsed, 1),
                         "cpu_seconds": round(float(fut.usage.get("cpu_seconds", 0.0)), 3),
                         "cost": float(fut.cost or 0.0)})
        self.task_rows = rows
        self.task_table.value = task_html(rows)
        self.task_count.value = str(self.tracker.submitted)
        self.spent.value = f"{self.tracker.tokens_spent():.6f}"

    def _refresh_providing(self) -> None:
        kp = kernel_provider.current()
        if kp is None:
            self.providing.layout.display = "none"
            self.providing.value = ""
            return
        s = kp.stats()
        self.providing.value = (
            f"<b>providing</b> as {html.escape(s['name'])} ({html.escape(str(s['id']))}): "
            f"{s['served']} tasks served · {s['cpu_seconds']:.2f} CPU-s used · "
            f"{s['earnings']:.6f} tokens earned")
        self.providing.layout.display = ""

    def state(self) -> dict[str, Any]:
        """What the widgets show now, as plain data (for tests, and for scripts to read)."""
        kp = kernel_provider.current()
        return {
            "gateway": self.gateway.value, "connection": self.connection.value,
            "account": self.account.tooltip, "balance": self.balance.value,
            "providers": [row.state() for row in self.provider_rows.values()],
            "selected": self.selected, "tasks": list(self.task_rows),
            "progress": [{"group": g.name, "done": g.done, "total": g.total, "errors": g.errors}
                         for state in self.progress for g in state.groups.values()],
            "totals": {"tasks": self.task_count.value, "tokens": self.spent.value},
            "providing": kp.stats() if kp is not None else None,
            "providing_shown": self.providing.layout.display != "none",
            "updating": self.updating,
        }
