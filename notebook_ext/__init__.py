"""decompute's user side: ``Client`` and futures, Dask integration, magics, the widget panel.

Importing this package stays cheap and side-effect free: IPython, ipywidgets and dask load only
when something needs them (``%load_ext notebook_ext``, the panel, ``progress``, a Dask graph), and
no Dask configuration is changed by the import.
"""

import sys
import types
from typing import Any

from gateway.receipt_log import ForkDetected
from gateway.receipts import verify_receipt
from notebook_ext.by_value import travels_by_value
from notebook_ext.client import Client, ProviderInfo
from notebook_ext.errors import (
    BudgetExceeded,
    DecomputeError,
    GatewayRefused,
    InsufficientFunds,
    NoMatchingProvider,
    ProviderLost,
    RemoteError,
    UntrustedResultError,
    VerificationFailed,
)
from notebook_ext.futures import Future, as_completed, wait
from notebook_ext.money import Balance, Receipt

__all__ = [
    "Balance", "BudgetExceeded", "Client", "DecomputeError", "ForkDetected", "Future",
    "GatewayRefused",
    "InsufficientFunds", "NoMatchingProvider", "ProviderInfo", "ProviderLost", "Receipt",
    "RemoteError",
    "UntrustedResultError", "VerificationFailed", "as_completed", "progress", "travels_by_value",
    "verify_receipt", "wait",
]


def progress(*args: Any, **kwargs: Any) -> Any:
    """Live per-task-group progress bars; see :func:`notebook_ext.progress.progress`."""
    from notebook_ext.progress import progress as _progress

    return _progress(*args, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext notebook_ext``: IPython is imported here, never by ``import notebook_ext``."""
    from notebook_ext import magics

    magics.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from notebook_ext import magics

    magics.unload_ipython_extension(ipython)


class _Package(types.ModuleType):
    """Importing the submodule ``notebook_ext.progress`` (the panel does) would rebind the
    package's ``progress`` to that module; ``from notebook_ext import progress`` must stay the
    function. The submodule stays importable (``from notebook_ext.progress import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "progress" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    # ``from notebook_ext import Panel`` still works, importing ipywidgets only when asked.
    if name == "Panel":
        from notebook_ext.panel import Panel

        return Panel
    raise AttributeError(f"module 'notebook_ext' has no attribute {name!r}")
