"""What the client puts on the wire and how it reads what comes back.

Functions and arguments are cloudpickled with protocol 5; arrays travel as out-of-band buffers, not
copied into the pickle stream. Results are read only through :mod:`notebook_ext.safe_pickle`.
Remote exceptions arrive as data (type, message, traceback text) and are rebuilt here: a standard
library exception type by name, anything else as :class:`RemoteError`. Nothing remote is unpickled
to make an exception.
"""

from __future__ import annotations

import builtins
import hashlib
import pickle
import platform
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from gateway import protocol as p
from notebook_ext import errors, safe_pickle


def local_runtime() -> p.Runtime:
    return p.Runtime(python=".".join(platform.python_version_tuple()[:2]),
                     cloudpickle=cloudpickle.__version__)


def dumps_function(fn: Any) -> tuple[str, bytes]:
    """The function's pickle and its content hash (providers cache functions by it)."""
    blob = cloudpickle.dumps(fn, protocol=5)
    return hashlib.blake2b(blob, digest_size=16).hexdigest(), blob


def dumps_args(args: tuple, kwargs: dict) -> list[bytes | memoryview]:
    """``[pickle stream, *out-of-band buffers]`` of ``(args, kwargs)``."""
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps((args, kwargs), protocol=5, buffer_callback=buffers.append)
    return [data, *(b.raw() for b in buffers)]


def loads_result(buffers: Sequence[memoryview], trust: bool, extra: Iterable[str]) -> Any:
    return safe_pickle.loads(buffers[0], buffers[1:], trust=trust, extra=extra)


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` so it prints above the error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip()


_BY_CODE: dict[str, type[Exception]] = {
    p.ErrorCode.NO_MATCH.value: errors.NoMatchingProvider,
    p.ErrorCode.LOST.value: errors.ProviderLost,
    p.ErrorCode.BUDGET.value: errors.BudgetExceeded,
    p.ErrorCode.FUNDS.value: errors.InsufficientFunds,
    p.ErrorCode.SCHEMA.value: errors.GatewayRefused,
    p.ErrorCode.LIMIT.value: errors.GatewayRefused,
    p.ErrorCode.RATE.value: errors.GatewayRefused,
    p.ErrorCode.AUTH.value: errors.GatewayRefused,
    p.ErrorCode.VERIFY.value: errors.VerificationFailed,
}


def rebuild_error(failure: p.RemoteFailure | None, code: str | None) -> BaseException:
    """The exception to raise locally for a remote failure."""
    if failure is None:
        failure = p.RemoteFailure(type="RemoteError", module="decompute",
                                  message=f"task failed ({code or 'no detail'})")
    if code in _BY_CODE:
        exc: BaseException = _BY_CODE[code](failure.message)
    elif code == p.ErrorCode.TIMEOUT.value:
        exc = TimeoutError(failure.message)
    else:
        exc = _stdlib_exception(failure) or errors.RemoteError(
            f"{failure.module}.{failure.type}", failure.message, failure.traceback)
    exc.remote_traceback = failure.traceback  # type: ignore[attr-defined]
    if failure.traceback:
        exc.__cause__ = RemoteTraceback(failure.traceback)
    return exc


def _stdlib_exception(failure: p.RemoteFailure) -> BaseException | None:
    """A builtins exception type rebuilt by name with its message, if that is safe and possible."""
    if failure.module != "builtins":
        return None
    cls = getattr(builtins, failure.type, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None  # never rebuild SystemExit/KeyboardInterrupt in the user's process
    try:
        return cls(failure.message)
    except Exception:  # types with a richer constructor (UnicodeDecodeError, ...)
        return None
