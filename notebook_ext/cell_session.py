"""One ``%%decompute`` run as the kernel sees it: what is sent, how it is waited on, what returns.

This module owns the kernel side of a remote cell (the provider side is
:mod:`notebook_ext.cell_runner`): pack the names the cell needs (failing *before* anything is
sent if one cannot be pickled), submit, stream the remote stdout/stderr into the running cell,
show a status line, cancel on KeyboardInterrupt, decode what comes back one name at a time
through the safe allow-list, and show a remote error the way IPython shows a local one.

It never decodes a result with the allow-list off unless the user passed ``--trust``.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import contextvars
import pickle
import re
import sys
import threading
import time
import traceback
import uuid
from typing import Any

import cloudpickle
from IPython.core.error import UsageError
from IPython.display import DisplayHandle, display

from notebook_ext import cell_runner, requirements, safe_pickle
from notebook_ext.cell_analysis import CellAnalysis, analyze, split_names
from notebook_ext.display import status_bundle
from notebook_ext.errors import RemoteError, UntrustedResultError
from notebook_ext.futures import Future

# Ship the runner by value: a provider needs nothing of notebook_ext to run a cell.
cloudpickle.register_pickle_by_value(cell_runner)

#: Quick cells stay quiet: the sync status line appears only after this many seconds.
PROGRESS_AFTER = 2.0
#: Status line refresh period (sync and --async).
STATUS_SECONDS = 0.5
#: Lines of streamed output kept in an --async status display.
ASYNC_OUTPUT_LINES = 200
_FRAME = re.compile(r'^  File "(?P<file>.*)", line (?P<line>\d+), in (?P<func>.*)$')
_RUNNER_FUNCS = frozenset({"run_cell", "_unpack"})


class CellFuture(cf.Future):
    """``%%decompute --async``: ``result()`` is the cell's last value, available once the names
    the cell assigned are in the namespace. ``status``, ``provider``, ``usage``, ``cost`` and
    ``output`` are the remote task's, live."""

    def __init__(self, remote: Future) -> None:
        super().__init__()
        self.remote = remote

    key = property(lambda self: self.remote.key)
    provider = property(lambda self: self.remote.provider)
    usage = property(lambda self: self.remote.usage)
    cost = property(lambda self: self.remote.cost)
    receipt = property(lambda self: self.remote.receipt)
    output = property(lambda self: self.remote.output)

    @property
    def status(self) -> str:
        return "cancelled" if self.cancelled() else self.remote.status

    def cancel(self) -> bool:
        self.remote.cancel()
        return super().cancel()

    def __await__(self):
        import asyncio

        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<decompute.CellFuture {self.key} {self.status}>"

    def _repr_html_(self) -> str:
        return status_bundle(self.remote, None, [])["text/html"]


class CellRun:
    """A submitted cell: wait for it (sync) or watch it (``--async``), then bring names back."""

    def __init__(self, shell: Any, client: Any, future: Future, analysis: CellAnalysis,
                 source: str, count: int, trust: bool, explicit_pull: bool) -> None:
        self.shell = shell
        self.client = client
        self.future = future
        self.analysis = analysis
        self.source = source
        self.count = count
        self.trust = trust
        self.explicit_pull = explicit_pull
        self.started = time.monotonic()
        self.written: list[str] = []  # names finish() put into the namespace

    @classmethod
    def prepare(cls, shell: Any, client: Any, cell: str, args: Any) -> CellRun:
        """Analyse, pack and submit; every user error is raised before anything is sent."""
        count = cell_number(shell)
        source = python_source(shell, cell, count)
        analysis = analyze(source)
        try:
            push = split_names(args.push)
            pull = split_names(args.pull)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        ns = shell.user_ns
        if push is None:
            hidden = shell.user_ns_hidden
            push = [n for n in analysis.reads
                    if n in ns and not (n in hidden and hidden[n] is ns[n])]
        else:
            missing = [n for n in push if n not in ns]
            if missing:
                raise UsageError(f"--push names not defined in this notebook: {', '.join(missing)}")
        try:  # before packing: the user's own modules among the values travel by value
            packages = requirements.for_cell(
                source, [ns[n] for n in push],
                requirements.split_flag(args.packages) if args.packages else None)
        except ValueError as exc:
            raise UsageError(f"--packages: {exc}") from None
        packed = {name: pack_value(name, ns[name]) for name in push}
        opts = dict(submit_options(client, args), packages=packages)
        display_last = analysis.has_last_expr and not analysis.quiet
        future = client.submit(
            cell_runner.run_cell, source, f"<decompute-cell-{count}>", packed,
            list(pull if pull is not None else analysis.assigns), display_last,
            (args.redundancy or 1) == 1, key=f"cell-In{count}-{uuid.uuid4().hex[:10]}",
            trust=False, **opts)
        return cls(shell, client, future, analysis, source, count, args.trust, pull is not None)

    # ------------------------------------------------------------------ waiting

    def wait(self) -> Any:
        """Block this cell until the run ends, streaming output; Ctrl-C cancels it remotely.

        The status line's place is reserved first (an empty display), so it stays at the top of
        the cell's output however much the run prints; it fills in after ``PROGRESS_AFTER``.
        """
        fut, shown, status_shown = self.future, 0, False
        handle = display({"text/plain": "", "text/html": ""}, raw=True, display_id=True)
        last = 0.0
        try:
            while True:
                done = fut.done()
                for stream, text in fut.output[shown:]:
                    (sys.stderr if stream == "stderr" else sys.stdout).write(text)
                    shown += 1
                if done:
                    break
                now = time.monotonic()
                if now - self.started > PROGRESS_AFTER and now - last > STATUS_SECONDS:
                    handle.update(status_bundle(fut, now - self.started, []), raw=True)
                    status_shown, last = True, now
                cf.wait([fut], timeout=0.05)
        except KeyboardInterrupt:
            fut.cancel()
            handle.update(status_bundle(fut, time.monotonic() - self.started, [],
                                        "interrupted: the remote run was cancelled"), raw=True)
            print(f"decompute: interrupted; cancelled the remote run {fut.key}", file=sys.stderr)
            raise with_rendering(KeyboardInterrupt(f"cancelled the remote run {fut.key}"),
                                 []) from None
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        if status_shown:
            handle.update(status_bundle(fut, time.monotonic() - self.started, []), raw=True)
        return self.finish()

    def start_async(self) -> CellFuture:
        """Return at once; a thread (in this cell's output context) shows the live status line
        and writes the names back when the run ends."""
        result = CellFuture(self.future)
        handle = display(status_bundle(self.future, 0.0, []), raw=True, display_id=True)
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._watch, result, handle), daemon=True,
                         name=f"decompute-{self.future.key}").start()
        return result

    def _watch(self, result: CellFuture, handle: DisplayHandle) -> None:
        fut = self.future
        while not fut.done():
            cf.wait([fut], timeout=STATUS_SECONDS)
            lines = "".join(t for _, t in fut.output).splitlines(True)[-ASYNC_OUTPUT_LINES:]
            handle.update(status_bundle(fut, time.monotonic() - self.started, lines), raw=True)
        note = ""
        try:
            value = self.finish()
            note = "names written: " + (", ".join(self.written) or "none")
            if not result.done():
                result.set_result(value)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever calls result()
            note = f"{type(exc).__name__}: {exc}"[:300] + " (call .result() for the traceback)"
            if not result.done():
                result.set_exception(exc)
        lines = "".join(t for _, t in fut.output).splitlines(True)[-ASYNC_OUTPUT_LINES:]
        handle.update(status_bundle(fut, time.monotonic() - self.started, lines, note), raw=True)

    # ------------------------------------------------------------------ bringing back

    def finish(self) -> Any:
        """Decode the run's outcome into the namespace; returns the value to show as Out[...]."""
        try:
            outcome = self.future.result()
        except cf.CancelledError:
            raise with_rendering(cf.CancelledError(f"the remote run {self.future.key} was "
                                                   f"cancelled"), []) from None
        except BaseException as exc:
            raise with_rendering(exc, render_remote_error(exc, self)) from None
        ns = self.shell.user_ns
        refused: dict[str, str] = {}
        for name, packed in outcome["values"].items():
            try:
                ns[name] = self.decode(packed)
                self.written.append(name)
            except UntrustedResultError as exc:
                refused[name] = exc.name
        if self.analysis.import_source and not self.explicit_pull:
            try:  # the cell's own import lines, never a module name chosen by the provider
                exec(self.analysis.import_source, ns)  # noqa: S102
            except Exception as exc:  # noqa: BLE001 - the module may exist only remotely
                print(f"decompute: the cell's imports ran on the provider but not here: {exc}",
                      file=sys.stderr)
        self._report(refused, outcome)
        if outcome["display"] is None:
            if outcome["display_error"]:
                print(f"decompute: the cell's value could not be sent back "
                      f"({outcome['display_error']}); showing its repr", file=sys.stderr)
                return _RemoteRepr(outcome["repr"] or "")
            return None
        try:
            return self.decode(outcome["display"])
        except UntrustedResultError as exc:
            print(f"decompute: the cell's value refers to {exc.name}, not on the safe "
                  f"allow-list; showing its remote repr (rerun with --trust to get the object)",
                  file=sys.stderr)
            return _RemoteRepr(outcome["repr"] or "")

    def decode(self, packed: list) -> Any:
        data, *buffers = packed
        return safe_pickle.loads(data, buffers, trust=self.trust,
                                 extra=self.client.trusted_types)

    def _report(self, refused: dict[str, str], outcome: dict) -> None:
        if refused:
            listed = ", ".join(f"{n} (refers to {g})" for n, g in refused.items())
            print(f"decompute: not brought back, their types are not on the safe allow-list: "
                  f"{listed}. Rerun with --trust if you trust the provider, or allow a type with "
                  f"client.trust_types(...).", file=sys.stderr)
        if outcome["skipped"]:
            listed = ", ".join(f"{n} ({why})" for n, why in outcome["skipped"].items())
            print(f"decompute: could not be pickled on the provider: {listed}", file=sys.stderr)
        if self.explicit_pull and outcome["missing"]:
            print(f"decompute: --pull names the cell did not define: "
                  f"{', '.join(outcome['missing'])}", file=sys.stderr)


class _RemoteRepr:
    """Shows a value that stayed on the provider by its remote repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def cell_number(shell: Any) -> int:
    """The running cell's ``In[n]``: IPython 9 counts the cell before running it (so
    ``execution_count`` is already n + 1), IPython 8 after; the running cell's own result
    record knows for sure."""
    running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    count = getattr(running, "execution_count", None)
    return int(count) if count is not None else int(shell.execution_count)


def python_source(shell: Any, cell: str, count: int) -> str:
    """The cell as plain Python; IPython syntax cannot run on a provider, so say so."""
    try:
        ast.parse(cell)
        return cell
    except SyntaxError as exc:
        transformed = shell.transform_cell(cell)
        if transformed != cell and "get_ipython()" in transformed:
            raise UsageError("%%decompute runs plain Python on a provider: IPython magics (%) "
                             "and shell escapes (!) only work in the kernel; move them to "
                             "another cell") from None
        # IPython renders a raised SyntaxError with the magic's own frames; say it plainly
        exc.filename = f"Cell In[{count}]"
        raise UsageError("the cell is not valid Python, nothing was sent:\n"
                         + "".join(traceback.format_exception_only(exc)).rstrip()) from None


def pack_value(name: str, value: Any) -> list:
    """One pushed name as ``[stream, *PickleBuffers]``; a clear error if it cannot be pickled."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise UsageError(
            f"cannot send {name!r} ({type(value).__module__}.{type(value).__qualname__}) to a "
            f"provider: it cannot be pickled ({type(exc).__name__}: {exc}). Nothing was sent. "
            f"Create it inside the cell instead, or choose the names to send with --push."
        ) from None
    return [data, *buffers]


def submit_options(client: Any, args: Any) -> dict[str, Any]:
    """Map the magic's flags onto ``submit``'s reserved keywords."""
    opts: dict[str, Any] = {}
    resources = {k: getattr(args, k) for k in ("cpus", "memory", "gpus")
                 if getattr(args, k) is not None}
    if resources:
        opts["resources"] = resources
    if args.provider:
        online = client.providers()
        ids = {p.id for p in online}
        by_name = {p.name: p.id for p in online}
        chosen = []
        for wanted in args.provider:
            if wanted not in ids and wanted not in by_name:
                names = ", ".join(f"{p.name} ({p.id})" for p in online) or "none"
                raise UsageError(f"no provider online with id or name {wanted!r}; online: {names}")
            chosen.append(wanted if wanted in ids else by_name[wanted])
        opts["providers"] = chosen
    for flag in ("max_price", "budget", "redundancy", "timeout"):
        if getattr(args, flag) is not None:
            opts[flag] = getattr(args, flag)
    return opts


def with_rendering(exc: BaseException, lines: list[str]) -> BaseException:
    """Make IPython show ``lines`` for ``exc`` instead of the magic's own (useless) frames."""
    rendered = lines or [f"\x1b[0;31m{type(exc).__name__}\x1b[0m: {exc}"]
    exc._render_traceback_ = lambda: rendered  # type: ignore[attr-defined]
    return exc


def render_remote_error(exc: BaseException, run: CellRun) -> list[str]:
    """IPython-style lines for a remote failure: the cell's frames with their source lines."""
    text = getattr(exc, "remote_traceback", "") or ""
    if not text:
        return []
    ename = exc.type_name if isinstance(exc, RemoteError) else type(exc).__name__
    cell_file = f"<decompute-cell-{run.count}>"
    source = run.source.splitlines()
    out = ["\x1b[0;31m" + "-" * 75 + "\x1b[0m",
           f"\x1b[0;31m{ename:<42}\x1b[0mTraceback (most recent call last)",
           f"(remote, on provider {run.future.provider or '?'}, task {run.future.key})"]
    lines, i = text.splitlines(), 0
    # the runner's own frames (always first) say nothing about the user's code
    in_cell = any(f"\"{cell_file}\"" in line for line in lines)
    skipping = True
    while i < len(lines):
        frame = _FRAME.match(lines[i])
        i += 1
        if frame is None:
            if lines[i - 1].startswith("Traceback (most recent call last)"):
                skipping = True  # each chained traceback starts in the runner again
            else:
                out.append(lines[i - 1])
            continue
        code = []
        while i < len(lines) and lines[i].startswith("    "):
            code.append(lines[i])
            i += 1
        skipping = skipping and frame["file"] != cell_file
        if (skipping and in_cell) or (frame["func"] in _RUNNER_FUNCS
                                      and frame["file"] != cell_file):
            continue
        if frame["file"] == cell_file:
            n = int(frame["line"])
            out.append(f"\x1b[0;32mCell In[{run.count}], line {n}\x1b[0m")
            for k in range(max(1, n - 2), min(len(source), n + 2) + 1):
                arrow = "\x1b[0;32m---> \x1b[0m" if k == n else "     "
                out.append(f"{arrow}{k:>3} {source[k - 1]}")
        else:
            out.append(f"File \x1b[0;32m{frame['file']}:{frame['line']}\x1b[0m, "
                       f"in {frame['func']}")
            out += [c for c in code if c.strip(" ~^")]
        out.append("")
    return out
