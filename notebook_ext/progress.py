"""``progress(...)``: live per-task-group progress of futures, like ``distributed.progress``.

Futures are grouped by their key's prefix (Dask's ``key_split``: ``("sum-abc", 0, 1)`` -> ``sum``,
``inc-<uuid>`` -> ``inc``). In a notebook it shows one ipywidgets bar per group and returns at
once (the bars keep updating); on a terminal it draws one text line with the overall bar and each
group's count, and returns when every future is done. Counting happens in the futures' done
callbacks, so drawing never polls the futures themselves and never touches the network.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from notebook_ext.dask_integration import wire_key_name
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
            name = wire_key_name(getattr(fut, "key", "") or type(fut).__name__)
            self.groups.setdefault(name, Group(name)).total += 1
        if not futures:
            self.finished.set()
        for fut in futures:  # after counting: a done future calls back at once
            name = wire_key_name(getattr(fut, "key", "") or type(fut).__name__)
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


class TextProgress:
    """One self-overwriting line on a terminal; blocks until everything is done."""

    def __init__(self, state: ProgressState, file: TextIO | None = None) -> None:
        self.state = state
        self.file = file or sys.stdout

    def run(self, timeout: float | None = None) -> None:
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

    def _draw(self) -> None:
        self.file.write("\r" + text_line(self.state))
        self.file.flush()


class WidgetProgress:
    """ipywidgets bars, one per group, updated by a background thread until everything is done.

    The thread is a daemon bound to this object's lifetime: it ends when the futures do.
    """

    def __init__(self, state: ProgressState) -> None:
        import ipywidgets as w

        self.state = state
        self.bars: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        rows = []
        for g in state.groups.values():
            self.bars[g.name] = w.IntProgress(value=0, min=0, max=max(g.total, 1),
                                              layout=w.Layout(width="60%"))
            self.labels[g.name] = w.HTML()
            rows.append(w.HBox([w.HTML(f"<code>{g.name}</code>",
                                       layout=w.Layout(width="20%")),
                                self.bars[g.name], self.labels[g.name]]))
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
            self.labels[g.name].value = f"{g.done} / {g.total}"
        self.elapsed.value = f"<small>{self.state.elapsed():.1f} s</small>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def in_notebook() -> bool:
    """True inside a Jupyter kernel with ipywidgets available (not a terminal IPython)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress(*objs: Any, notebook: bool | None = None, timeout: float | None = None,
             file: TextIO | None = None) -> WidgetProgress | None:
    """Show progress of futures, lists of them, or persisted collections.

    In a notebook (``notebook=None`` detects it) it displays per-group bars and returns the
    :class:`WidgetProgress` at once; elsewhere it draws a text line on ``file`` (stdout) and
    returns once all are done (``TimeoutError`` after ``timeout`` seconds).
    """
    futures = futures_of(list(objs))
    state = ProgressState(futures)
    if notebook is None:
        notebook = in_notebook()
    if notebook:
        from IPython.display import display

        shown = WidgetProgress(state).start()
        display(shown.widget)
        return shown
    TextProgress(state, file).run(timeout)
    return None
