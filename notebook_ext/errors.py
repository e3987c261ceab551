"""Errors a notebook user can catch.

Each says what happened and what to do. Error codes on the wire (``gateway.protocol.ErrorCode``)
map onto these types in one place, :func:`error_for_code`, so the client never guesses.
"""

from __future__ import annotations


class DecomputeError(Exception):
    """Base class of every error decompute raises on the client."""


class UntrustedResultError(DecomputeError):
    """A result names a global outside the allow-list; nothing of it was run.

    Pass ``trust=True`` to the call (or ``Client(trust=True)``) if you trust every provider that
    may run it, or allow one type with ``client.trust_types(SomeClass)``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"result refers to {name!r}, which is not on the safe-result allow-list; nothing "
            f"was unpickled. If you trust the providers, pass trust=True, or allow this one "
            f"type with client.trust_types({name!r})."
        )


class RemoteError(DecomputeError):
    """A remote exception whose type is not safe to rebuild locally.

    Carries the remote type's qualified name, its message and the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__(f"{type_name}: {message}")


class NoMatchingProvider(DecomputeError):
    """No online provider can take the task (resources, pinning, runtime, price or allow-list)."""


class ProviderLost(DecomputeError):
    """The provider running the task vanished more times than ``retries`` allows."""


class BudgetExceeded(DecomputeError):
    """The task used its whole ``budget`` and was stopped; you were charged at most the budget."""


class InsufficientFunds(DecomputeError):
    """The account cannot cover the escrow the task needs; nothing was dispatched."""


class GatewayRefused(DecomputeError):
    """The gateway refused a request (a limit, a malformed request, or authentication)."""


class VerificationFailed(DecomputeError):
    """``redundancy=k`` replicas disagreed and no majority emerged: no result is trusted."""


class CancelledByRemote(DecomputeError):
    """The provider or gateway cancelled the task."""
