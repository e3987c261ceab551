"""decompute's volunteer side: the provider daemon, its sandboxed workers and metering."""

from typing import Any

__all__ = ["Provider"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m provider.worker` starts without importing the daemon (and its imports).
    if name == "Provider":
        from provider.provider import Provider

        return Provider
    raise AttributeError(name)
