"""IPython magics: ``%decompute`` (connect, providers, balance, panel, provide, stop-providing)
and ``%%decompute`` (run a cell on a provider). Load with ``%load_ext notebook_ext``.

This module owns the kernel's one :class:`~notebook_ext.client.Client` and the glue between a
cell and a remote run; the cell's *local* journey (ship names, stream, decode, show errors) lives
in :mod:`notebook_ext.cell_session`, the remote one in :mod:`notebook_ext.cell_runner`. The magics
write to the cell's stdout/stderr: that is the user's output, not logging.

Style follows ipyparallel's ``%%px``: every flag is declared once with ``magic_arguments`` so
``%%decompute?`` prints real help, output streams while the cell runs, and a status line appears
only after a couple of seconds so quick cells stay quiet.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import (
    MagicArgumentParser,
    argument,
    magic_arguments,
    parse_argstring,
)

from notebook_ext import cell_session, kernel_provider
from notebook_ext.cell_session import CellFuture
from notebook_ext.client import Client
from notebook_ext.display import ProviderTable, format_tokens
from notebook_ext.errors import GatewayRefused
from notebook_ext.panel import Panel, TaskTracker

__all__ = ["CellFuture", "DecomputeMagics", "Panel", "get_client", "load_ipython_extension",
           "unload_ipython_extension"]


def _subparsers() -> dict[str, MagicArgumentParser]:
    def parser(name: str, description: str) -> MagicArgumentParser:
        return MagicArgumentParser(prog=f"decompute {name}", description=description,
                                   add_help=False)

    connect = parser("connect", "Connect this kernel to a gateway (default: $DECOMPUTE_GATEWAY, "
                                "else ws://127.0.0.1:8765); returns the Client.")
    connect.add_argument("url", nargs="?", help="gateway address, e.g. ws://127.0.0.1:8765")
    connect.add_argument("--trust", action="store_true",
                         help="decode every result without the safe allow-list")
    panel = parser("panel", "Open the live panel: JupyterLab's right sidebar through sidecar "
                            "when installed, else inline.")
    panel.add_argument("--inline", action="store_true", help="show it in the cell output")
    provide = parser("provide", "Make this kernel a provider: a background thread, tasks in "
                                "sandboxed subprocesses, earnings to this kernel's account.")
    provide.add_argument("--cpus", type=int, default=1, help="task slots (default 1)")
    provide.add_argument("--memory", help="memory offered, e.g. 2GiB (default: all)")
    provide.add_argument("--price", type=float, default=0.0, help="tokens per CPU-second")
    provide.add_argument("--name", help="name shown to clients (default: host-kernel-pid)")
    return {
        "connect": connect,
        "providers": parser("providers", "Show the providers online now."),
        "balance": parser("balance", "Show this account's token balance."),
        "panel": panel,
        "provide": provide,
        "stop-providing": parser("stop-providing", "Stop this kernel's provider; its running "
                                                   "tasks go back to the gateway's queue."),
    }


SUBCOMMANDS = _subparsers()


@magics_class
class DecomputeMagics(Magics):
    """The kernel's decompute state: one client, at most one panel and one kernel provider."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Client | None = None
        self.panel: Panel | None = None
        self.last_future: Any = None

    # ------------------------------------------------------------------ the kernel's client

    def connect(self, url: str | None = None, trust: bool = False) -> Client:
        """Replace the kernel's client with one for ``url``."""
        self.close_client()
        # stream_output=False: the magic writes a cell's output itself, into that cell
        self.client = Client(url, trust=trust, stream_output=False)
        TaskTracker.attach(self.client)  # so the panel's totals count tasks from the start
        return self.client

    def get_client(self) -> Client:
        """The kernel's client, connecting to the default address on first use."""
        if self.client is None or self.client.closed:
            try:
                return self.connect()
            except ConnectionError as exc:  # no gateway: say how to start one, no traceback
                raise UsageError(str(exc)) from None
        return self.client

    def close_client(self) -> None:
        if self.panel is not None:
            self.panel.close()
            self.panel = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def shutdown(self) -> None:
        """Unload: stop the panel, the kernel provider and the client, in that order."""
        if self.panel is not None:
            self.panel.close()
            self.panel = None
        kernel_provider.stop_providing()
        self.close_client()

    # ------------------------------------------------------------------ %decompute

    @line_magic("decompute")
    def decompute_line(self, line: str = "") -> Any:
        words = line.split(None, 1)
        if not words or words[0] in ("help", "-h", "--help"):
            print(self.decompute_line.__doc__)
            return None
        command, rest = words[0], words[1] if len(words) > 1 else ""
        if command not in SUBCOMMANDS:
            raise UsageError(f"unknown subcommand {command!r}; use one of: "
                             f"{', '.join(SUBCOMMANDS)} (see %decompute?)")
        args = SUBCOMMANDS[command].parse_argstring(rest)
        return getattr(self, "_cmd_" + command.replace("-", "_"))(args)

    def _cmd_connect(self, args: Any) -> Client:
        try:
            return self.connect(args.url, trust=args.trust)
        except ConnectionError as exc:
            raise UsageError(str(exc)) from None

    def _cmd_providers(self, _args: Any) -> ProviderTable:
        return ProviderTable(self.get_client().providers())

    def _cmd_balance(self, _args: Any) -> float | None:
        try:
            return self.get_client().balance()
        except GatewayRefused as exc:
            print(f"balance: — (the gateway keeps no ledger for this account: {exc})",
                  file=sys.stderr)
            return None

    def _cmd_panel(self, args: Any) -> None:
        client = self.get_client()
        if self.panel is not None:
            self.panel.close()
        self.panel = Panel(client)
        where = self.panel.show("inline" if args.inline else "auto")
        if where == "sidecar":
            print("decompute panel opened in JupyterLab's right sidebar "
                  "(%decompute panel --inline shows it here instead)")

    def _cmd_provide(self, args: Any) -> kernel_provider.KernelProvider:
        url = self.get_client().address
        try:
            kp = kernel_provider.start_providing(url, name=args.name, cpus=args.cpus,
                                                 memory=args.memory, price=args.price)
        except (RuntimeError, ValueError, TimeoutError) as exc:
            raise UsageError(str(exc)) from None
        print(f"providing to {url} as {kp.name} (id {kp.id}): {args.cpus} CPU slot(s) at "
              f"{args.price:g} tokens per CPU-second; %decompute stop-providing stops it")
        return kp

    def _cmd_stop_providing(self, _args: Any) -> None:
        kp = kernel_provider.stop_providing()
        if kp is None:
            print("this kernel was not providing")
        else:
            s = kp.stats()
            print(f"stopped providing as {s['name']}: {s['served']} tasks served, "
                  f"{s['cpu_seconds']:.2f} CPU-s, {format_tokens(s['earnings'])} tokens earned")

    # ------------------------------------------------------------------ %%decompute

    @cell_magic("decompute")
    @magic_arguments("%decompute")
    @argument("--provider", action="append", metavar="ID",
              help="run only on this provider (id or name; repeatable). Default: the providers "
                   "checked in the panel, else any")
    @argument("--cpus", type=int, help="CPUs the task needs")
    @argument("--memory", help="memory the task needs, e.g. 2GiB")
    @argument("--gpus", type=int, help="GPUs the task needs")
    @argument("--max-price", type=float, metavar="P", help="highest price, tokens per CPU-second")
    @argument("--budget", type=float, metavar="B", help="most tokens this run may cost")
    @argument("--redundancy", type=int, metavar="K",
              help="run on K providers and keep the majority result")
    @argument("--timeout", type=float, metavar="S", help="stop the run after S seconds")
    @argument("--async", dest="run_async", action="store_true",
              help="return at once with a live status line; the future is bound to -o NAME")
    @argument("-o", "--output", metavar="NAME", help="bind the run's future to NAME")
    @argument("--push", metavar="a,b", help="send exactly these names (overrides the analysis)")
    @argument("--pull", metavar="x,y",
              help="bring back exactly these names (overrides the analysis)")
    @argument("--trust", action="store_true",
              help="decode results without the safe allow-list (only if you trust the provider)")
    @argument("--packages", metavar="a,b",
              help="requirements a provider must meet, e.g. 'scikit-learn>=1.5,numpy>=2,<3'")
    def decompute_cell(self, line: str, cell: str) -> Any:
        """Run this cell on a decompute provider, as if it ran here.

        The names the cell reads that exist in this notebook are sent with it (cloudpickled);
        a name that cannot be pickled is an error naming it, before anything is sent. The names
        the cell assigns come back into the notebook; its last expression is shown as Out[...];
        stdout/stderr stream into the cell while it runs; an error shows the remote traceback;
        interrupting the kernel (Ctrl-C, the stop button) cancels the remote run. Imports run
        on the provider, and again here (best effort) so names like np stay usable.

        Results come back through decompute's safe allow-list (numbers, strings, containers,
        numpy arrays, pandas objects, datetimes, ...), so a provider cannot run code in your
        kernel. A value of another type, such as an instance of a class you defined or a
        function the cell defines, is not brought back; its name is reported. Pass --trust to
        accept any type from this run (only when you trust the provider), or allow one type
        with client.trust_types(SomeClass).
        """
        args = parse_argstring(self.decompute_cell, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o needs a Python name, not {args.output!r}")
        client = self.get_client()
        run = cell_session.CellRun.prepare(self.shell, client, cell, args)
        self.last_future = run.future
        if args.run_async:
            future = run.start_async()
            if args.output:
                self.shell.user_ns[args.output] = future
                return None
            return future
        future = CellFuture(run.future)  # -o in a waiting run binds the same kind of future
        if args.output:
            self.shell.user_ns[args.output] = future
        try:
            value = run.wait()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value

    decompute_line.__doc__ = (
        "Control decompute from this kernel.\n\n"
        "::\n\n  %decompute connect [URL] [--trust]\n  %decompute providers\n"
        "  %decompute balance\n  %decompute panel [--inline]\n"
        "  %decompute provide [--cpus N] [--memory 2GiB] [--price P] [--name NAME]\n"
        "  %decompute stop-providing\n\n"
        "Any subcommand connects to the default gateway on first use "
        "($DECOMPUTE_GATEWAY, else ws://127.0.0.1:8765). Run a cell remotely with %%decompute "
        "(see %%decompute?).\n\n"
        + "\n".join(p.format_help() for p in SUBCOMMANDS.values())
    )


_magics: DecomputeMagics | None = None


def get_client() -> Client:
    """The kernel's client (as ``%decompute connect`` made it, or the default on first use)."""
    if _magics is None:
        raise RuntimeError("load the extension first: %load_ext notebook_ext")
    return _magics.get_client()


def get_panel() -> Panel | None:
    """The panel ``%decompute panel`` opened in this kernel (None before), e.g. to read
    ``get_panel().state()``: what it shows, as plain data."""
    return None if _magics is None else _magics.panel


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext notebook_ext``: register ``%decompute`` and ``%%decompute``."""
    global _magics
    _magics = DecomputeMagics(ipython)
    ipython.register_magics(_magics)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop what the extension started and remove its magics."""
    global _magics
    if _magics is not None:
        _magics.shutdown()
        _magics = None
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("decompute", None)
