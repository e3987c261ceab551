"""Errors a notebook user can catch.

Each says what happened and what to do. Error codes on the wire (``gateway.protocol.ErrorCode``)
map onto these types in one place, :func:`error_for_code`, so the client never guesses.
"""

from __future__ import annotations


class DecomputeError(Exception):
    """Base class of every error decompute raises on the client."""


#: Globals that build classes, functions or code, or reach any attribute: trusting one would
#: admit arbitrary code, so no message ever suggests it.
_NEVER_TRUST_PREFIXES = ("cloudpickle.", "types.", "builtins.type", "builtins.getattr",
                         "builtins.eval", "builtins.exec", "builtins.compile",
                         "builtins.__import__", "builtins.setattr", "builtins.object",
                         "copyreg.", "functools.", "operator.", "importlib.", "pickle.",
                         "os.", "posix.", "nt.", "subprocess.", "sys.", "runpy.", "code.")


def _never_trust(name: str) -> bool:
    return name.startswith(_NEVER_TRUST_PREFIXES)


class UntrustedResultError(DecomputeError):
    """A result names a global outside the allow-list; nothing of it was run.

    Pass ``trust=True`` to the call (or ``Client(trust=True)``) if you trust every provider that
    may run it, or allow one class of yours with ``client.trust_types(SomeClass)``.
    """

    def __init__(self, name: str, *, by_value: bool = False) -> None:
        self.name = name
        short = name.rsplit(".", 1)[-1]
        if _never_trust(name):
            advice = (
                "That global builds arbitrary classes or code, so it is never safe to allow. "
                "If the task returns an instance of a class you defined, call "
                "client.trust_types(YourClass) with that very class (defined in your notebook, "
                "script or an importable module, and used by the task); otherwise return plain "
                "data (numbers, str, lists, dicts, numpy arrays, pandas objects), or pass "
                "trust=True only if you trust every provider that may run the task.")
        elif by_value:
            advice = (
                f"It is a class shipped by value (defined in a notebook or script). If it is "
                f"your class {short} and the task used it, allow it with "
                f"client.trust_types({short}) (pass the class object; a class the provider made "
                f"up is never accepted), or pass trust=True if you trust every provider.")
        else:
            advice = (
                f"If you trust the providers, pass trust=True, or allow this one type with "
                f"client.trust_types({short}) (the class itself) or "
                f"client.trust_types({name!r}).")
        super().__init__(
            f"result refers to {name!r}, which is not on the safe-result allow-list; nothing "
            f"was unpickled. {advice}")


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
