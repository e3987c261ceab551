"""The client's side of spot checks: the ``spot_check=`` and ``check=`` keywords, the check
function's wrapper that runs on the checking provider, and ``fut.verification``.

The gateway draws which results are checked and never unpickles anything (see
:mod:`gateway.spot_check`). With ``check=FN``, the client ships ``FN`` wrapped in
:func:`run_check` with each task; when the gateway checks a result, the checker runs the wrapper
on ``(claimed result bytes, argument bytes)``. The claimed result comes from another, untrusted
provider, so the wrapper reads it through the same allow-list unpickler the client uses.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle

from gateway import protocol as p
from notebook_ext import by_value, safe_pickle

if TYPE_CHECKING:
    from notebook_ext.futures import Future

_lock = threading.Lock()
#: Futures whose result was delivered unchecked: a late check may still report on them.
_watched: weakref.WeakValueDictionary[tuple[int, str], Future] = weakref.WeakValueDictionary()


def take(kwargs: dict, opts: dict, client: Any) -> dict[str, bytes]:
    """Pop ``spot_check`` and ``check`` from a call's keywords into ``opts``; returns the check
    function's pickle by its hash (the submission's extra functions)."""
    rate = kwargs.pop("spot_check", 0.0) or 0.0
    check = kwargs.pop("check", None)
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"spot_check must be a rate between 0 and 1, not {rate!r}")
    if check is not None and not callable(check):
        raise TypeError("check must be a function check(result, *args, **kwargs) -> bool")
    if check is not None and not rate:
        raise ValueError("check= needs spot_check= > 0 (the share of results to check)")
    opts["spot_check"] = float(rate)
    if check is None:
        return {}
    by_value.prepare(check)
    wrapped = functools.partial(run_check, check, bool(client.trust),
                                tuple(sorted(client._trusted)))
    blob = cloudpickle.dumps(wrapped, protocol=5)
    digest = hashlib.blake2b(blob, digest_size=16).hexdigest()
    opts["check"] = digest
    return {digest: blob}


def run_check(check: Callable[..., Any], trust: bool, extra: Sequence[str],
              result: list, args: list) -> bool:
    """On the checker: ``check(claimed result, *args, **kwargs)``, as a plain bool. The claimed
    result is decoded with the allow-list (it comes from another provider)."""
    value = safe_pickle.loads(result[0], result[1:], trust=trust, extra=extra)
    call_args, call_kwargs = cloudpickle.loads(args[0], buffers=args[1:])
    return bool(check(value, *call_args, **call_kwargs))


def note(client: Any, result: p.Result, fut: Future | None) -> None:
    """A result said how it was verified: ``fut.verification``; a late check updates the
    future of a result delivered earlier."""
    info = result.verification
    if info is None:
        return
    info = dict(info)
    with _lock:
        if fut is None:
            fut = _watched.get((id(client), result.key))
            if fut is None or not info.get("late"):
                return
        elif not info.get("checked"):
            _watched[(id(client), result.key)] = fut
    fut.verification = info
    if info.get("late") and result.cost:
        fut.cost += result.cost
