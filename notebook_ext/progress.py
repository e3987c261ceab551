"""``progress(...)``: live per-task-group progress of futures, like ``distributed.progress``.

Futures are grouped by their key's prefix (Dask's ``key_split``: ``("sum-abc", 0, 1)`` -> ``sum``,
``inc-<uuid>`` -> ``inc``, a ``%%decompute`` cell -> ``In[18]``). In a notebook it shows one
ipywidgets bar per group, once, and returns at once (the bars keep updating); on a terminal it
draws one text line with the overall bar and each group's count, and returns when every future is
done. Counting happens in the futures' done callbacks, so drawing never polls the futures
themselves and never touches the network.

A collection that is not computed yet holds no futures to watch; ``progress`` persists it on the
client first (as ``client.persist``) so the bars follow the real computation. Importing this
module imports neither Dask nor ipywidgets.
"""

from __future__ import annotations

import concurrent.futures as cf
import html
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from notebook_ext.display import task_group
from notebook_ext.futures import Future

#: Seconds between redraws: often enough to look live, rare enough to cost nothing.
REDRAW_SECONDS = 0.1
BAR_WIDTH = 30


def futures_of(obj: Any) -> list[Future]:
    """The decompute futures in ``obj``: a future, containers of them, or a persisted
    collection (whose graph holds them), in first-seen order."""
    found: dict[int, Future] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, Future):
            found.setdefault(id(item), item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(reversed(list(item)))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif hasattr(item, "__dask_graph__"):
            graph = item.__dask_graph__()
            if graph is not None:
                stack.extend(v for v in dict(graph).values() if isinstance(v, Future))
    return list(found.values())


@dataclass(slots=True)
class Group:
    """One task group's counts."""

    name: str
    total: int = 0
    done: int = 0
    errors: int = 0


class ProgressState:
    """Per-group counts of a set of futures, kept current by their done callbacks (any thread).

    The panel can reuse it: read ``groups`` after ``changed`` fires.
    """

    def __init__(self, futures: list[cf.Future]) -> None:
        self.start = time.monotonic()
        self.groups: dict[str, Group] = {}
        self.changed = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._left = len(futures)
        for fut in futures:
            name = task_group(getattr(fut, "key", "") or type(fut).__name__)
            self.groups.setdefault(name, Group(name)).total += 1
        if not futures:
            self.finished.set()
        for fut in futures:  # after counting: a done future calls back at once
            name = task_group(getattr(fut, "key", "") or type(fut).__name__)
            fut.add_done_callback(self._callback(name))

    def _callback(self, name: str) -> Callable[[cf.Future], None]:
        def done(fut: cf.Future) -> None:
            failed = fut.cancelled() or fut.exception() is not None
            with self._lock:
                group = self.groups[name]
                group.done += 1
                group.errors += failed
                self._left -= 1
                if self._left == 0:
                    self.finished.set()
            self.changed.set()

        return done

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups.values())

    @property
    def done(self) -> int:
        return sum(g.done for g in self.groups.values())

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def text_line(state: ProgressState, width: int = BAR_WIDTH) -> str:
    """``[#####-----] 50% | sum 2/4 | add 4/4 (1 error) | 0.6s``"""
    total, done = state.total, state.done
    fraction = done / total if total else 1.0
    filled = int(round(fraction * width))
    parts = [f"[{'#' * filled}{'-' * (width - filled)}] {fraction:4.0%}"]
    for g in state.groups.values():
        errors = f" ({g.errors} error{'s' if g.errors > 1 else ''})" if g.errors else ""
        parts.append(f"{g.name} {g.done}/{g.total}{errors}")
    parts.append(f"{state.elapsed():.1f}s")
    return " | ".join(parts)


def summary(state: ProgressState) -> str:
    """``8/8 done, 1 failed, in 0.4 s``: what a finished (or running) progress object reads as."""
    failed = sum(g.errors for g in state.groups.values())
    return (f"{state.done}/{state.total} done" + (f", {failed} failed" if failed else "")
            + f", in {state.elapsed():.1f} s")


class TextProgress:
    """One self-overwriting line on a terminal; blocks until everything is done."""

    def __init__(self, state: ProgressState, file: TextIO | None = None) -> None:
        self.state = state
        self.file = file or sys.stdout
        #: Collections ``progress`` persisted because they were not computed yet.
        self.persisted: list[Any] = []

    def run(self, timeout: float | None = None) -> TextProgress:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.state.finished.is_set():
            self._draw()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"progress: not done after {timeout} s")
            self.state.changed.wait(REDRAW_SECONDS)
            self.state.changed.clear()
        self._draw()
        self.file.write("\n")
        self.file.flush()
        return self

    def _draw(self) -> None:
        self.file.write("\r" + text_line(self.state))
        self.file.flush()

    def __repr__(self) -> str:
        return f"<decompute progress: {summary(self.state)}>"


class WidgetProgress:
    """ipywidgets bars, one per group, updated by a background thread until everything is done.

    It is displayed once: :func:`progress` shows it, and when it is also a cell's last value
    ``_ipython_display_`` draws nothing more (IPython would otherwise show the bars twice).
    The thread is a daemon bound to this object's lifetime: it ends when the futures do.
    """

    def __init__(self, state: ProgressState) -> None:
        import ipywidgets as w

        self.state = state
        self.persisted: list[Any] = []
        self.shown = False
        self.bars: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        rows = []
        for g in state.groups.values():
            self.bars[g.name] = w.IntProgress(value=0, min=0, max=max(g.total, 1),
                                              layout=w.Layout(flex="1 1 auto", width="auto",
                                                              min_width="60px"))
            self.labels[g.name] = w.HTML(layout=w.Layout(flex="0 0 auto"))
            name = w.HTML(f"<code title='{html.escape(g.name)}'>{html.escape(g.name)}</code>",
                          layout=w.Layout(flex="0 1 30%", overflow="hidden"))
            rows.append(w.HBox([name, self.bars[g.name], self.labels[g.name]],
                               layout=w.Layout(width="100%")))
        self.elapsed = w.HTML()
        self.widget = w.VBox([*rows, self.elapsed])
        self._thread = threading.Thread(target=self._update_until_done, daemon=True,
                                        name="decompute-progress")

    def start(self) -> WidgetProgress:
        self._draw()
        self._thread.start()
        return self

    def _update_until_done(self) -> None:
        while not self.state.finished.is_set():
            self.state.changed.wait(REDRAW_SECONDS)
            self.state.changed.clear()
            self._draw()
        self._draw()

    def _draw(self) -> None:
        for g in self.state.groups.values():
            bar = self.bars[g.name]
            bar.value = g.done
            bar.bar_style = "danger" if g.errors else ("success" if g.done == g.total else "")
            failed = f", {g.errors} failed" if g.errors else ""
            self.labels[g.name].value = f"{g.done} / {g.total}{failed}"
        total = "" if self.state.groups else "nothing to wait for · "
        self.elapsed.value = f"<small>{total}{self.state.elapsed():.1f} s</small>"

    def show(self) -> WidgetProgress:
        """Display the bars (once: a second call, or IPython showing the cell's value, is a
        no-op)."""
        if not self.shown:
            from IPython.display import display

            self.shown = True
            display(self.widget)
        return self

    def _ipython_display_(self) -> None:
        self.show()

    def __repr__(self) -> str:
        return f"<decompute progress: {summary(self.state)}>"


def in_notebook() -> bool:
    """True inside a Jupyter kernel with ipywidgets available (not a terminal IPython)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def current_client() -> Any:
    """The client a bare ``progress(collection)`` computes on: Dask's configured scheduler if it
    is one, else the kernel's ``%decompute`` client. None if there is neither."""
    dask = sys.modules.get("dask")
    if dask is not None:
        scheduler = dask.config.get("scheduler", None)
        if hasattr(scheduler, "persist") and not getattr(scheduler, "closed", True):
            return scheduler
    magics = sys.modules.get("notebook_ext.magics")
    holder = getattr(magics, "_magics", None) if magics is not None else None
    client = getattr(holder, "client", None)
    if client is not None and not client.closed:
        return client
    return None


def _persist(todo: list[Any], client: Any) -> list[Any]:
    """Persist the collections in ``todo`` (not computed yet) on ``client``; returns them
    persisted, in order."""
    if not todo:
        return []
    client = client or current_client()
    if client is None:
        raise ValueError(
            "progress() was given a collection that is not computed yet and knows no client to "
            "compute it on: pass client=..., or persist it first: x = client.persist(x); "
            "progress(x)")
    persisted = client.persist(todo)
    return list(persisted) if isinstance(persisted, (list, tuple)) else [persisted]


def progress(*objs: Any, notebook: bool | None = None, timeout: float | None = None,
             file: TextIO | None = None, client: Any = None) -> WidgetProgress | TextProgress:
    """Show progress of futures, lists of them, or Dask collections.

    A collection not computed yet is persisted first on ``client`` (default: Dask's configured
    scheduler, else the kernel's ``%decompute`` client); the persisted collections are the
    returned object's ``persisted`` list, in the order given. In a notebook (``notebook=None``
    detects it) it displays per-group bars once and returns the :class:`WidgetProgress` at
    once; elsewhere it draws a text line on ``file`` (stdout) and returns the
    :class:`TextProgress` once all are done (``TimeoutError`` after ``timeout`` seconds).
    """
    uncomputed = [o for o in objs if hasattr(o, "__dask_graph__") and not futures_of(o)]
    persisted = _persist(uncomputed, client)
    watched = [o for o in objs if all(o is not u for u in uncomputed)] + persisted
    state = ProgressState(futures_of(watched))
    if notebook is None:
        notebook = in_notebook()
    shown: WidgetProgress | TextProgress
    if notebook:
        shown = WidgetProgress(state).start()
        shown.persisted = persisted
        return shown.show()
    shown = TextProgress(state, file)
    shown.persisted = persisted
    return shown.run(timeout)
