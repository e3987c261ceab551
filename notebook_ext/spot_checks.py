"""The client's side of spot checks: the ``spot_check=`` and ``check=`` keywords of ``submit``
and ``map``, the check function's wrapper that runs on the checking provider, and
``fut.verification``.

- ``spot_check=RATE`` (0..1): the gateway checks that share of the results, drawn by its own
  random source when each result arrives, on a provider of another account. A checked result is
  delivered (and paid) only once it passed; one that failed is computed again elsewhere and its
  provider is not paid. ``map`` with ``spot_check`` runs each item as its own task.
- ``check=FN``: instead of re-running the whole task, the checker runs
  ``FN(result, *args, **kwargs) -> bool`` on the claimed result (a cheap partial recomputation;
  it must say True for every correct result). Without it, the check is a full re-run whose
  result must hash the same (deterministic tasks only).
- ``fut.verification``: ``{"kind": "spot_check", "checked": bool, "by": [checker ids],
  "passed": bool, "claimed_by": id, "caught": [ids], ...}``; ``"late": True`` once a check of
  a result delivered unchecked reported (after its provider was caught cheating elsewhere in
  this session). A ``redundancy`` task's says who agreed and who was out-voted.

The gateway never unpickles anything (see :mod:`gateway.spot_check`): the client ships ``FN``
wrapped in :func:`run_check` with each task; when the gateway checks a result, the checker runs
the wrapper on ``(claimed result bytes, argument bytes)``. The claimed result comes from
another, untrusted provider, so the wrapper reads it through the allow-list unpickler the client
uses for results.
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
    """A result says how it was verified: ``fut.verification``. One delivered unchecked is
    watched: a late check may report on it (:func:`late`)."""
    if result.verification is None or fut is None:
        return
    fut.verification = dict(result.verification)
    if not result.verification.get("checked"):
        with _lock:
            _watched[(id(client), result.key)] = fut


def late(client: Any, result: p.Result) -> bool:
    """A late check's report on a result delivered earlier: it updates that future's
    ``verification`` (and adds the check's cost); True if ``result`` was one (it is no
    outcome: the task's key may name a newer task by now)."""
    info = result.verification
    if info is None or not info.get("late"):
        return False
    with _lock:
        fut = _watched.pop((id(client), result.key), None)
    if fut is not None:
        fut.verification = dict(info)
        fut.cost += result.cost
    return True
