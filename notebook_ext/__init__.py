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
)
from notebook_ext.futures import Future, as_completed, wait

__all__ = [
    "BudgetExceeded", "Client", "DecomputeError", "Future", "GatewayRefused",
    "InsufficientFunds", "NoMatchingProvider", "ProviderInfo", "ProviderLost", "RemoteError",
    "UntrustedResultError", "as_completed", "verify_receipt", "wait",
]
