"""decompute's user side: ``Client`` and futures, Dask integration, magics, the widget panel."""

from gateway.receipts import verify_receipt
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
from notebook_ext.progress import progress

__all__ = [
    "BudgetExceeded", "Client", "DecomputeError", "Future", "GatewayRefused",
    "InsufficientFunds", "NoMatchingProvider", "ProviderInfo", "ProviderLost", "RemoteError",
    "UntrustedResultError", "VerificationFailed", "as_completed", "progress", "verify_receipt",
    "wait",
]
from notebook_ext.magics import Panel, load_ipython_extension, unload_ipython_extension  # noqa: E402,F401,I001
