"""Dask on decompute: ``scheduler=client``, ``client.get``, ``client.compute``, ``client.persist``.

This module owns the *lowering* of a Dask graph into :class:`~notebook_ext.client.GraphTask`s:
it turns the collection into one optimized task-spec graph exactly as ``dask.compute`` does
(``collections_to_expr``, ``FinalizeCompute``, ``optimize``), culls it to the requested keys,
resolves aliases to the key that holds the value (no task, no copy), orders it with
``dask.order`` and names every key on the wire with a string. The graph's structure (keys and
dependencies) travels as msgpack; each task travels as an opaque cloudpickled blob in its
arguments, run by one shared function, :func:`run_task`, so the function blob is sent once and
cached by providers.

It never unpickles anything a provider made: results are read only through
:meth:`Future.result`, i.e. the client's allow-list decoder.

Wire keys: a Dask key (``"x-abc"`` or ``("x-abc", 0, 1)``) becomes its compact JSON followed by
``#`` and a token unique to one submission (``["x-abc",0,1]#1f2e3d4c``), so two computations of
the same collection never share (or release) each other's results. :func:`dask_key` maps back.
A key whose JSON would pass the wire's 256-character limit is named by a hash instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import heapq
import json
import logging
import secrets
import sys
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from notebook_ext.client import GraphTask

if TYPE_CHECKING:
    from notebook_ext.client import Client
    from notebook_ext.futures import Future

log = logging.getLogger(__name__)

Key = Hashable
#: The keywords ``get``/``compute``/``persist`` pass on to every task (``submit``'s reserved ones).
TASK_OPTIONS = ("providers", "resources", "max_price", "budget", "redundancy", "timeout",
                "retries", "trust")
#: Longest wire key the gateway accepts (``gateway.protocol.MAX_KEY_LEN``).
MAX_WIRE_KEY = 256
_SEP = "#"

# The runner below travels by value: a provider's task process then needs neither this module nor
# notebook_ext's imports (websockets, the Client) to run a Dask task, only dask itself.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


_TOKENIZER: list[bool] = []


def _register_tokenizer() -> None:
    """A persisted collection's name is a token of its graph, which holds our futures: a
    future's token is its key (as ``distributed.Future``'s), deterministic and cheap. Done at
    the first lowering, not at import: importing decompute leaves Dask as it was."""
    if _TOKENIZER:
        return
    from dask.tokenize import normalize_token

    from notebook_ext.futures import Future

    normalize_token.register(Future)(lambda fut: ("decompute.Future", fut.key))
    _TOKENIZER.append(True)


#: Task groups of Dask's disk shuffle (partd): its tasks share one local directory, which
#: cannot span providers (nor even two sandboxed task processes).
DISK_SHUFFLE_GROUPS = frozenset({"zpartd", "partd"})


def task_shuffles() -> Any:
    """A ``dask.config.set`` context in which shuffles are tasks unless the user chose a
    method: a disk shuffle cannot span providers. Used around the optimizations decompute runs
    itself (``client.compute``/``persist``); an open ``Client`` also makes it Dask's default
    while it lives (see ``notebook_ext.client``), for ``compute(scheduler=client)``."""
    import contextlib

    import dask

    if dask.config.get("dataframe.shuffle.method", None) is not None:
        return contextlib.nullcontext()
    return dask.config.set({"dataframe.shuffle.method": "tasks"})


def run_task(deps: Mapping[str, Any], node: Any, names: Sequence[tuple[Key, str]]) -> Any:
    """Run one task-spec node on a provider: ``deps`` maps wire keys to values, ``names`` maps
    the node's Dask dependency keys to those wire keys."""
    return node({dask: deps[wire] for dask, wire in names})


# --------------------------------------------------------------------------- wire keys


def _jsonable(key: Key) -> Any:
    if isinstance(key, tuple):
        return [_jsonable(k) for k in key]
    if isinstance(key, (str, int, float)) and not isinstance(key, bool):
        return key
    raise TypeError(f"not a JSON-able Dask key part: {key!r}")


def wire_key(key: Key, token: str) -> str:
    """The string naming Dask key ``key`` on the wire, for the submission ``token``."""
    try:
        text = json.dumps(_jsonable(key), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = None
    if text is not None and len(text) + len(token) + 1 <= MAX_WIRE_KEY:
        return f"{text}{_SEP}{token}"
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
    return f"~{key_name(key)[:120]}~{digest}{_SEP}{token}"


def _tuplify(value: Any) -> Key:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def dask_key(wire: str) -> Key | None:
    """The Dask key a wire key names, or None (not one of ours, or a hashed long key)."""
    text, sep, _ = wire.rpartition(_SEP)
    if not sep or text.startswith("~"):
        return None
    try:
        return _tuplify(json.loads(text))
    except ValueError:
        return None


def key_name(key: Key) -> str:
    """The task-group name of a Dask key (``key_split``): what progress bars group by."""
    from dask.utils import key_split

    return key_split(key)


def wire_key_name(wire: str) -> str:
    """The task-group name of any future's key: a Dask wire key, or a plain ``submit`` key."""
    key = dask_key(wire)
    if key is not None:
        return key_name(key)
    if wire.startswith("~"):
        return wire[1:].split("~", 1)[0]
    return key_name(wire)


# --------------------------------------------------------------------------- lowering


@dataclass
class Lowered:
    """A culled graph as GraphTasks in submission order (dependencies first).

    ``wire`` maps every needed Dask key to the wire key holding its value (an alias maps to its
    target's); ``external`` holds the earlier futures (persisted results) the graph reads.
    """

    tasks: list[GraphTask]
    wire: dict[Key, str]
    external: dict[str, Future] = field(default_factory=dict)


def task_graph(dsk: Any) -> tuple[dict[Key, Any], dict[str, Future]]:
    """Any Dask graph (expression, HighLevelGraph, legacy or task-spec dict) as a task-spec
    dict, plus the decompute futures it holds as values (a persisted collection's chunks)."""
    from dask._task_spec import convert_legacy_graph

    from notebook_ext.futures import Future

    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    dsk = dict(dsk)
    futures = {v.key: v for v in dsk.values() if isinstance(v, Future)}
    return convert_legacy_graph(dsk), futures


def lower(dsk: Any, keys: Sequence[Key], known: Mapping[str, Future] | None = None,
          token: str | None = None) -> Lowered:
    """Lower the part of ``dsk`` that ``keys`` need; ``known`` are futures (by wire key) the
    graph may depend on besides those it holds. Raises as ``dask.local.get_sync`` would: a
    ``KeyError`` for a requested key that is nowhere, ``ValueError`` for a missing dependency."""
    from dask._task_spec import Alias
    from dask.order import order

    _register_tokenizer()
    graph, held = task_graph(dsk)
    known = {**(known or {}), **held}
    token = token or secrets.token_hex(4)
    needed: dict[Key, Any] = {}
    external: dict[str, Future] = {}
    dependents: dict[Key, set[Key]] = {}
    stack = list(dict.fromkeys(keys))
    while stack:
        key = stack.pop()
        if key in needed or isinstance(key, str) and key in external:
            continue
        node = graph.get(key)
        if node is None:
            if isinstance(key, str) and key in known:
                external[key] = known[key]
                continue
            if key not in dependents:
                raise KeyError(key)
            raise ValueError(f"Missing dependency {key} for dependents {dependents[key]} (a "
                             "decompute future in a graph must come from this client's compute "
                             "or persist and still be referenced)")
        if key_name(key) in DISK_SHUFFLE_GROUPS:
            raise ValueError("this graph shuffles through one machine's disk (partd), which cannot "
                             "span providers; build it with dask.config.set({'dataframe.shuffle."
                             "method': 'tasks'}) (or shuffle='tasks')")
        needed[key] = node
        for dep in node.dependencies:
            dependents.setdefault(dep, set()).add(key)
            stack.append(dep)
    wire: dict[Key, str] = {k: k for k in external}
    tasks: list[GraphTask] = []
    for key in _topological(needed, order(needed)):
        node = needed[key]
        if isinstance(node, Alias):
            wire[key] = wire[node.target]  # the target's result is the value: no task, no copy
            continue
        wire[key] = wire_key(key, token)
        names = tuple((dep, wire[dep]) for dep in node.dependencies)
        deps = tuple(dict.fromkeys(w for _, w in names))
        tasks.append(GraphTask(wire[key], run_task, (node, names), deps=deps))
    return Lowered(tasks, wire, external)


def _topological(graph: Mapping[Key, Any], priority: Mapping[Key, int]) -> Iterator[Key]:
    """Dependencies before dependents; among ready keys, Dask's order (memory-friendly)."""
    waiting = {k: {d for d in node.dependencies if d in graph} for k, node in graph.items()}
    dependents: dict[Key, list[Key]] = {}
    for key, deps in waiting.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(key)
    ready = [(priority.get(k, 0), i, k) for i, (k, deps) in enumerate(waiting.items())
             if not deps]
    heapq.heapify(ready)
    counter = len(ready)
    while ready:
        _, _, key = heapq.heappop(ready)
        yield key
        for child in dependents.get(key, ()):
            waiting[child].discard(key)
            if not waiting[child]:
                counter += 1
                heapq.heappush(ready, (priority.get(child, 0), counter, child))


# --------------------------------------------------------------------------- on a client

#: Futures this module handed out (by wire key), so later graphs can depend on them. Weak: a
#: result nobody references any more may already be released on its provider.
_RESULTS: weakref.WeakValueDictionary[str, Future] = weakref.WeakValueDictionary()


def _options(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = set(kwargs) - set(TASK_OPTIONS)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(unknown)}; "
                        f"it accepts {', '.join(TASK_OPTIONS)}")
    return kwargs


def _submit(client: Client, lowered: Lowered, outputs: Sequence[Key], send: bool,
            opts: dict[str, Any]) -> dict[Key, Future]:
    """Submit a lowered graph; the futures of ``outputs`` (only those: intermediates are
    released on the providers as soon as their dependents have run)."""
    for key, fut in lowered.external.items():
        if fut.client is not client:
            raise ValueError(f"the graph depends on {key!r}, a result of another Client")
    out_wire = {lowered.wire[k] for k in outputs}
    submitted = client.submit_graph(lowered.tasks, send=out_wire if send else (), **opts)
    result = {}
    for k in outputs:
        wire = lowered.wire[k]
        result[k] = submitted[wire] if wire in submitted else lowered.external[wire]
    for fut in result.values():
        _RESULTS[fut.key] = fut
    return result


def _flatten(keys: Any) -> Iterator[Key]:
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten(k)
    else:
        yield keys


def _nested(keys: Any, values: Mapping[Key, Any]) -> Any:
    """``dask.local.nested_get``: lists of keys become tuples of values."""
    if isinstance(keys, list):
        return tuple(_nested(k, values) for k in keys)
    return values[keys]


def get(client: Client, dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask's ``get`` scheduler interface: compute ``keys`` (a key or nested lists of keys) of
    ``dsk`` on the network; results in the shape of ``keys``. The first error raises (the
    original type where it is safe to rebuild) and cancels what is still running."""
    opts = _options(kwargs, "get")
    flat = list(dict.fromkeys(_flatten(keys)))
    lowered = lower(dsk, flat, _RESULTS)
    futures = _submit(client, lowered, flat, send=True, opts=opts)
    try:
        cf.wait(list(futures.values()), return_when=cf.FIRST_EXCEPTION)
        values = {k: f.result() for k, f in futures.items()}
    except KeyboardInterrupt:
        _cancel(futures, lowered)
        raise KeyboardInterrupt("interrupted while computing a Dask graph; its tasks still "
                                "running were cancelled") from None
    except Exception as exc:
        _cancel(futures, lowered)
        root = client.first_failure(lowered.tasks[0].key.rpartition(_SEP)[2]) \
            if lowered.tasks else None
        failed = {f.key for f in futures.values() if f.done() and not f.cancelled()
                  and f.exception() is not None}
        if root is not None and root[0] not in failed:  # an input failed: that is the news
            raise root[1] from exc
        raise
    return _nested(keys, values)


def _cancel(futures: Mapping[Key, Future], lowered: Lowered) -> None:
    for fut in futures.values():
        if not fut.done() and fut.key not in lowered.external:
            fut.cancel()


def _expression(collections: Sequence[Any], optimize_graph: bool, finalize: bool) -> Any:
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr

    with task_shuffles():
        expr = collections_to_expr(list(collections), optimize_graph)
        return (FinalizeCompute(expr) if finalize else expr).optimize()


def compute(client: Client, collections: Any, *, sync: bool = False, optimize_graph: bool = True,
            traverse: bool = True, **kwargs: Any) -> Any:
    """A future for each collection's result (as ``distributed.Client.compute``): one future for
    one collection, a list for a list. The result stays on its provider until ``result()``;
    other values pass through unchanged. ``sync=True`` returns the results instead."""
    import dask
    from dask.core import flatten

    opts = _options(kwargs, "compute")
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a
                 for a in items]
    variables = [a for a in items if dask.is_dask_collection(a)]
    futures: list[Future] = []
    if variables:
        expr = _expression(variables, optimize_graph, finalize=True)
        names = list(flatten(expr.__dask_keys__()))
        by_key = _submit(client, lower(expr, names, _RESULTS), names, send=False, opts=opts)
        futures = [by_key[k] for k in names]
    found = iter(futures)
    results = [next(found) if dask.is_dask_collection(a) else a for a in items]
    if sync:
        results = [r.result() if isinstance(r, cf.Future) else r for r in results]
    return results[0] if singleton else results


def persist(client: Client, collections: Any, *, optimize_graph: bool = True,
            **kwargs: Any) -> Any:
    """The same collection(s), rebuilt on futures of their chunks, which stay on the providers.

    The new collection's graph holds those futures, which keeps the chunks alive; a later graph
    built from it depends on them by key, so no data comes back through the client.
    """
    import dask
    from dask.core import flatten

    opts = _options(kwargs, "persist")
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if not all(dask.is_dask_collection(c) for c in items):
        raise TypeError("persist() takes Dask collections (array, dataframe, bag, delayed)")
    expr = _expression(items, optimize_graph, finalize=False)
    keys = expr.__dask_keys__()
    names = list(dict.fromkeys(flatten(keys)))
    futures = _submit(client, lower(expr, names, _RESULTS), names, send=False, opts=opts)
    rebuilt = []
    for coll, coll_keys in zip(items, keys, strict=True):
        rebuild, state = coll.__dask_postpersist__()
        rebuilt.append(rebuild({k: futures[k] for k in flatten([coll_keys])}, *state))
    return rebuilt[0] if singleton else rebuilt

