"""What runs on the provider for a ``%%decompute`` cell.

:func:`run_cell` is shipped **by value** (``cloudpickle.register_pickle_by_value``), so a provider
needs nothing of ``notebook_ext`` installed: this module must only ever use the standard library
and ``cloudpickle`` (which every worker has). It runs inside the provider's sandboxed task process,
never in the gateway and never in the kernel.

Why each value comes back as its own pickle (``{name: [stream, *buffers]}``) rather than one
dict: the kernel decodes every name separately through the safe allow-list, so one value of an
untrusted type (a function or class instance defined in the cell) is refused by name while the
numbers, arrays and frames beside it still arrive. Arrays stay out-of-band (``PickleBuffer``), so
they are not copied into the pickle stream on their way back.
"""

from __future__ import annotations

import ast
import builtins
import linecache
import pickle
import sys
import types
from typing import Any

#: Longest ``repr`` of the last value sent along as a fallback display.
REPR_LIMIT = 20_000


def _pack(value: Any) -> list:
    """One value as ``[pickle stream, *PickleBuffers]`` (protocol 5, arrays out-of-band)."""
    import cloudpickle

    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return [data, *buffers]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _display(*objs: Any, **_kwargs: Any) -> None:
    """IPython's ``display`` for a cell running remotely: no front end here, so print reprs."""
    for obj in objs:
        print(repr(obj))


def _unpack(name: str, packed: list) -> Any:
    """A pushed name, loaded on its own so a failure names the variable it belongs to."""
    import cloudpickle

    data, *buffers = packed
    try:
        return cloudpickle.loads(data, buffers=buffers)
    except Exception as exc:
        raise RuntimeError(f"could not load {name!r} on this provider: "
                           f"{type(exc).__name__}: {exc}") from exc


def run_cell(source: str, filename: str, pushed: dict[str, list], pull: list[str],
             display_last: bool, with_repr: bool = True) -> dict[str, Any]:
    """Execute a cell's source with the ``pushed`` names as its globals; return what the kernel
    needs.

    Returns ``{"values": {name: packed}, "skipped": {name: reason}, "missing": [names],
    "modules": [names], "display": packed | None, "repr": str | None, "display_error": str}``.
    An exception in the cell propagates unchanged, so the provider reports it (and its
    traceback, whose cell frames name ``filename`` with the cell's real source lines).
    """
    # Register the source so the remote traceback shows the cell's lines, not just numbers.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last: ast.Expression | None = None
    if display_last and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    scope: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins,
                             "display": _display}
    scope.update({name: _unpack(name, packed) for name, packed in pushed.items()})
    # dont_inherit: this module's ``from __future__`` flags must not change the cell's meaning
    exec(compile(tree, filename, "exec", dont_inherit=True), scope)  # noqa: S102
    value = None
    if last is not None:
        value = eval(compile(last, filename, "eval", dont_inherit=True), scope)  # noqa: S307
    sys.stdout.flush()
    sys.stderr.flush()

    out: dict[str, Any] = {"values": {}, "skipped": {}, "missing": [], "modules": [],
                           "display": None, "repr": None, "display_error": ""}
    for name in pull:
        if name not in scope:
            out["missing"].append(name)
            continue
        item = scope[name]
        if isinstance(item, types.ModuleType):
            out["modules"].append(name)  # the kernel repeats the import instead
            continue
        try:
            out["values"][name] = _pack(item)
        except Exception as exc:  # noqa: BLE001 - one unpicklable value must not lose the rest
            out["skipped"][name] = _describe(exc)
    if value is not None:
        try:
            out["display"] = _pack(value)
        except Exception as exc:  # noqa: BLE001
            out["display_error"] = _describe(exc)
        if with_repr:
            try:
                out["repr"] = repr(value)[:REPR_LIMIT]
            except Exception as exc:  # noqa: BLE001
                out["repr"] = f"<repr failed: {_describe(exc)}>"
    return out
