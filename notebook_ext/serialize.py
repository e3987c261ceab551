"""What the client puts on the wire and how it reads what comes back.

Functions and arguments are cloudpickled with protocol 5; arrays travel as out-of-band buffers, not
copied into the pickle stream. Results are read only through :mod:`notebook_ext.safe_pickle`.
Remote exceptions arrive as data (type, message, traceback text) and are rebuilt here: a standard
library exception type by name, anything else as :class:`RemoteError`. Nothing remote is unpickled
to make an exception.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import operator
import pickle
import platform
import types
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from gateway import protocol as p
from notebook_ext import by_value, errors, safe_pickle


@functools.cache
def local_runtime() -> p.Runtime:
    """This interpreter's runtime (fixed for the process; asked once per task)."""
    return p.Runtime(python=".".join(platform.python_version_tuple()[:2]),
                     cloudpickle=cloudpickle.__version__)


def dumps_function(fn: Any) -> tuple[str, bytes]:
    """The function's pickle and its content hash (providers cache functions by it).

    A function submitted again unchanged reuses its pickle (:func:`_fingerprint` says when that
    is safe); anything else is pickled afresh. The user's own modules it references are
    registered to travel by value first (:mod:`notebook_ext.by_value`)."""
    by_value.prepare(fn)
    fingerprint = _fingerprint(fn) if isinstance(fn, types.FunctionType) else None
    if fingerprint is not None:
        cached = _PICKLED.get(fn)
        if cached is not None and _same(cached[0], fingerprint):
            return cached[1]
    blob = cloudpickle.dumps(fn, protocol=5)
    pickled = hashlib.blake2b(blob, digest_size=16).hexdigest(), blob
    if fingerprint is not None:
        _PICKLED[fn] = (fingerprint, pickled)
    return pickled


#: Pickles of functions, weakly keyed by the function object itself: an entry dies with its
#: function, so a new function that reuses a dead one's id() never finds it.
_PICKLED: weakref.WeakKeyDictionary[types.FunctionType, tuple[tuple, tuple[str, bytes]]] = (
    weakref.WeakKeyDictionary())
#: Values a pickle may be reused over by identity: they cannot change in place.
_ATOMS = (int, float, complex, str, bytes, bool, type(None), range, types.BuiltinFunctionType)
_MISSING = object()  # a name the function's globals do not define (a builtin, an attribute)
_SELF = object()  # the cached function itself, reached again (recursion)
_CYCLE = object()  # a helper reached again while its own fingerprint is being made
_TUPLE, _SET, _FUNC = object(), object(), object()  # where a nested part begins
_FINGERPRINT_DEPTH = 4


def _by_reference(obj: Any) -> bool:
    """True when cloudpickle pickles ``obj`` as an importable name (its pickle is that name)."""
    check = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
    try:
        return bool(check is not None and check(obj))
    except Exception:  # anything unexpected: not cacheable
        return False




def _add_value(out: list, value: Any, depth: int, seen: set[int],
               top: types.FunctionType) -> bool:
    """Append what a value contributes to a fingerprint; False when it could change in place."""
    if type(value) in _ATOMS or value is _MISSING:  # exact types: a subclass may be mutable
        out.append(value)
        return True
    if type(value) in (tuple, frozenset):  # a subclass (a namedtuple) may be pickled by value
        if depth <= 0 or len(value) > 256:
            return False
        # Its elements, not the object (it could hold the cached function and keep it alive).
        out += (_TUPLE if isinstance(value, tuple) else _SET, type(value), len(value))
        return all(_add_value(out, v, depth - 1, seen, top) for v in value)
    if isinstance(value, (type, types.FunctionType, types.ModuleType)) and _by_reference(value):
        out.append(value)
        return True
    if isinstance(value, types.FunctionType) and depth > 0:  # a helper pickled by value
        inner = _fingerprint(value, depth - 1, seen, top)
        if inner is None:
            return False
        out += (_FUNC, len(inner), *inner)
        return True
    return False  # lists, dicts, instances, classes pickled by value: may change in place


def _fingerprint(fn: types.FunctionType, depth: int = _FINGERPRINT_DEPTH,
                 seen: set[int] | None = None,
                 top: types.FunctionType | None = None) -> tuple | None:
    """Everything ``fn``'s pickle is made of, as a flat tuple of objects compared by identity;
    None when some of it could change without a new object (a mutable global, closure value,
    function attribute...).

    A redefined function is a new object; a changed ``__code__``, default, closure cell or
    global binding is a different object here; the values kept are immutable (and kept alive,
    so their ids are not reused). So an equal fingerprint means an equal pickle. Functions
    cloudpickle pickles by reference reduce to their name and are always cacheable."""
    seen = set() if seen is None else seen
    top = fn if top is None else top
    if id(fn) in seen:  # recursion: a function whose fingerprint is being made (held below)
        return (_SELF,) if fn is top else (_CYCLE, fn)
    seen.add(id(fn))
    # The cached function itself is the cache's weak key: holding it here would keep it alive.
    head: list[Any] = [] if fn is top else [fn]
    if _by_reference(fn):
        return (*head, fn.__module__, fn.__qualname__)
    if fn.__dict__:
        return None
    out: list[Any] = [*head, fn.__code__, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__]
    values: list[Any] = [fn.__defaults__, tuple((fn.__kwdefaults__ or {}).items()),
                         tuple(fn.__annotations__.items())]
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            values.append(_MISSING)
    globals_ = fn.__globals__
    values += [globals_.get(name, _MISSING) for name in by_value.code_names(fn.__code__)]
    if not all(_add_value(out, value, depth, seen, top) for value in values):
        return None
    return tuple(out)


def forget_pickles() -> None:
    """Drop the cached function pickles (a module now travels another way: ``ship_module``)."""
    _PICKLED.clear()


def _same(a: tuple, b: tuple) -> bool:
    """Fingerprints equal element by element by identity (``==`` could call user code)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


#: Argument types pickled by the standard library's C pickler: cloudpickle would write the same
#: stream, ~7x slower (a map of 20,000 ints pays it 20,000 times).
_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _plain(value: Any, depth: int = 3) -> bool:
    if isinstance(value, _PLAIN) and type(value) in _PLAIN:
        return True
    if depth and type(value) in (tuple, list):
        return len(value) <= 64 and all(_plain(v, depth - 1) for v in value)
    if depth and type(value) is dict:
        return len(value) <= 64 and all(type(k) is str and _plain(v, depth - 1)
                                        for k, v in value.items())
    return False


def dumps_args(args: tuple, kwargs: dict) -> list[bytes | memoryview]:
    """``[pickle stream, *out-of-band buffers]`` of ``(args, kwargs)``."""
    if _plain(args) and _plain(kwargs):
        return [pickle.dumps((args, kwargs), protocol=5)]
    by_value.prepare(*args, *kwargs.values())  # instances of the user's classes
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
