"""``Client``: submit Python functions to decompute providers and get futures back.

The API follows ``distributed.Client`` (``submit``, ``map``, ``gather``, futures that feel
native), so habits carry over. The connection lives on the client's own event-loop thread; the
calling thread pickles arguments and decodes results, so neither blocks the other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import os
import secrets
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway import protocol as p
from gateway.identity import Identity
from gateway.units import parse_size
from notebook_ext import errors, safe_pickle
from notebook_ext.connection import GatewayLink
from notebook_ext.futures import Future, RawResult, StoredResult
from notebook_ext.serialize import (
    dumps_args,
    dumps_function,
    loads_result,
    local_runtime,
    rebuild_error,
)

log = logging.getLogger(__name__)

DEFAULT_GATEWAY = "ws://127.0.0.1:8765"
#: Tasks per Submit frame in ``map``: bounds one frame's header to a few hundred KiB.
MAP_BATCH = 1000
_RESERVED = ("key", "providers", "resources", "max_price", "budget", "redundancy", "timeout",
             "retries", "trust", "pure")


@dataclass(frozen=True, slots=True)
class GraphTask:
    """One task of a graph: on a provider, ``fn(deps, *args, **kwargs)`` where ``deps`` maps
    each key in ``deps`` to its result (results of this session's earlier tasks)."""

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """A provider as ``client.providers()`` shows it."""

    id: str
    name: str
    cpus: int
    memory: int
    gpus: int
    prices: dict
    runtime: dict
    sandbox: str
    load: dict
    reputation: float = 1.0
    online: bool = True
    running: int = 0
    slots: int = 1
    account: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> ProviderInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        extra = {k: v for k, v in data.items() if k not in cls.__dataclass_fields__}
        return cls(**known, extra=extra)


class Client:
    """A connection to a decompute gateway, as this machine's identity.

    ``address`` defaults to ``$DECOMPUTE_GATEWAY``, else ``ws://127.0.0.1:8765``. ``trust=True``
    unpickles results without the allow-list (only if you trust every provider).
    """

    #: Dask asks this of any scheduler object named "Client": this one blocks (its own loop
    #: thread does the I/O), so it is synchronous from the caller's point of view.
    asynchronous = False

    def __init__(self, address: str | None = None, *, trust: bool = False, timeout: float = 30.0,
                 name: str = "", home: str | os.PathLike | None = None,
                 stream_output: bool = True, reconnect_for: float = 60.0) -> None:
        self.address = address or os.environ.get("DECOMPUTE_GATEWAY") or DEFAULT_GATEWAY
        self.trust = trust
        self.stream_output = stream_output
        self.identity = Identity.load_or_create(home)
        self.session = secrets.token_hex(8)
        self.default_providers: list[str] | None = None
        self._trusted: set[str] = set()
        self._futures: dict[str, Future] = {}
        self._submit_listeners: list[Callable[[list[Future]], None]] = []
        self._replies: dict[int, cf.Future] = {}
        self._fetches: dict[str, cf.Future] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="decompute-client")
        self._thread.start()
        self._link = GatewayLink(self.address, self.identity, self.session, self._on_message,
                                 self._on_resumed, self._on_lost, name, reconnect_for)
        try:
            welcome = self._call(self._link.open(timeout), timeout + 5)
        except Exception as exc:
            self._stop_loop()
            raise ConnectionError(
                f"could not connect to the decompute gateway at {self.address}: {exc!r}. Is one "
                f"running? Start one with `decompute-gateway --local-providers 2`."
            ) from exc
        self.account: str = welcome.account
        self.gateway_key: str = welcome.gateway.hex()
        self.max_message: int = welcome.max_message

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is still running for this client and close the connection."""
        if self._closed:
            return
        self._closed = True
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            self._cancel_keys([f.key for f in pending])
            for fut in pending:  # nobody will answer them now: never leave result() hanging
                fut._cancel_locally()
        try:
            self._call(self._drain_and_close(), 10)
        finally:
            self._stop_loop()

    async def _drain_and_close(self) -> None:
        await asyncio.sleep(0)  # let queued frames (the cancel) reach the writer
        await self._link.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __repr__(self) -> str:
        return f"<decompute.Client {self.address} account={self.account[:12]}>"

    # ------------------------------------------------------------------ submitting

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a provider; returns a :class:`Future` at once.

        Reserved keywords (as in Dask): ``key``, ``providers``, ``resources``, ``max_price``,
        ``budget``, ``redundancy``, ``timeout``, ``retries``, ``trust``.
        """
        opts = {k: kwargs.pop(k) for k in _RESERVED if k in kwargs}
        func_hash, blob = dumps_function(fn)
        key = opts.pop("key", None) or f"{_name(fn)}-{uuid.uuid4().hex}"
        spec, payload = self._task(key, func_hash, dumps_args(args, kwargs), opts)
        return self._send_batch([spec], [payload], func_hash, blob, opts.get("trust"))[0]

    def map(self, fn: Any, *iterables: Iterable, **kwargs: Any) -> list[Future]:
        """``submit(fn, *items)`` for each item of ``zip(*iterables)``; batched on the wire."""
        opts = {k: kwargs.pop(k) for k in _RESERVED if k in kwargs}
        keys = opts.pop("key", None)
        func_hash, blob = dumps_function(fn)
        prefix = f"{_name(fn)}-{uuid.uuid4().hex[:12]}"
        futures: list[Future] = []
        items = list(zip(*iterables, strict=False))
        for start in range(0, len(items), MAP_BATCH):
            specs, payloads = [], []
            for i, item in enumerate(items[start:start + MAP_BATCH], start):
                key = keys[i] if keys is not None else f"{prefix}-{i}"
                spec, payload = self._task(key, func_hash, dumps_args(item, kwargs), opts)
                specs.append(spec)
                payloads.append(payload)
            futures += self._send_batch(specs, payloads, func_hash, blob, opts.get("trust"))
        return futures

    def submit_graph(self, tasks: Sequence[GraphTask], send: Iterable[str] = (),
                     **opts: Any) -> dict[str, Future]:
        """Submit tasks that take each other's results, in dependency order.

        Each result stays on the provider that computed it (intermediates move between providers
        only when a dependent runs elsewhere); keys in ``send`` also come back to the client.
        The returned futures resolve as tasks finish; ``result()`` of a key not sent fetches it.
        A kept result is released on the providers once its future is garbage-collected and no
        pending task needs it. ``opts`` are ``submit``'s reserved keywords.
        """
        send = set(send)
        futures: dict[str, Future] = {}
        for start in range(0, len(tasks), MAP_BATCH):
            funcs: dict[int, tuple[str, bytes]] = {}
            specs, payloads = [], []
            for t in tasks[start:start + MAP_BATCH]:
                if id(t.fn) not in funcs:
                    funcs[id(t.fn)] = dumps_function(t.fn)
                spec, payload = self._task(t.key, funcs[id(t.fn)][0],
                                           dumps_args(t.args, t.kwargs), opts)
                specs.append(replace(spec, deps=list(t.deps), keep=True, send=t.key in send))
                payloads.append(payload)
            blobs = dict(funcs.values())
            batch = self._send_tasks(specs, payloads, blobs, opts.get("trust"))
            futures.update((f.key, f) for f in batch)
        for key, fut in futures.items():
            weakref.finalize(fut, self._release_key, key)
        return futures

    def _release_key(self, key: str) -> None:
        """A kept result's future was collected: the providers may free it (GC thread)."""
        if not self._closed and self._loop.is_running():
            frame = p.encode(p.Release(keys=[key]))
            self._loop.call_soon_threadsafe(self._link.send, frame)

    def _fetch(self, key: str, timeout: float | None) -> list[memoryview]:
        """The bytes of a result kept on a provider."""
        waiter = self._fetches.get(key)
        if waiter is None or waiter.done() and waiter.exception() is not None:
            waiter = self._fetches[key] = cf.Future()
            frame = p.encode(p.Fetch(keys=[key]))
            self._loop.call_soon_threadsafe(self._link.send, frame)
        return waiter.result(timeout)

    def _task(self, key: str, func_hash: str, payload: list, opts: dict) -> tuple[p.TaskSpec, list]:
        resources = dict(opts.get("resources") or {})
        if "memory" in resources:
            resources["memory"] = parse_size(resources["memory"])
        providers = opts.get("providers", self.default_providers)
        spec = p.TaskSpec(
            key=key, func=func_hash, nb=len(payload), runtime=local_runtime(),
            resources=resources, providers=list(providers) if providers else None,
            timeout=opts.get("timeout"), retries=opts.get("retries", 2),
            budget=opts.get("budget"), max_price=opts.get("max_price"),
            redundancy=opts.get("redundancy", 1),
        )
        return spec, payload

    def _send_batch(self, specs: list[p.TaskSpec], payloads: list[list], func_hash: str,
                    blob: bytes, trust: bool | None) -> list[Future]:
        return self._send_tasks(specs, payloads, {func_hash: blob}, trust)

    def _send_tasks(self, specs: list[p.TaskSpec], payloads: list[list], funcs: dict[str, bytes],
                    trust: bool | None) -> list[Future]:
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        frame = p.encode_parts(p.Submit(tasks=specs, funcs=list(funcs)),
                               [*funcs.values(), *(b for payload in payloads for b in payload)])
        size = p.frame_size(frame)
        if self.max_message and size > self.max_message:
            raise errors.GatewayRefused(
                f"this submission is too large: {size:,} bytes, but the gateway at {self.address} "
                f"accepts "
                f"messages up to {self.max_message:,} bytes; pass smaller arguments (or split a "
                f"map into smaller ones); nothing was sent")
        trust = self.trust if trust is None else trust
        futures = []
        for spec in specs:
            if spec.key in self._futures and not self._futures[spec.key].done():
                raise ValueError(f"key {spec.key!r} is already in use by a running task")
            fut = self._futures[spec.key] = Future(self, spec.key, trust)
            futures.append(fut)
        self._loop.call_soon_threadsafe(self._link.send, frame)
        for listener in self._submit_listeners:
            listener(futures)
        return futures

    def on_submit(self, listener: Callable[[list[Future]], None]) -> None:
        """Call ``listener(futures)`` with each batch of new futures (the panel tracks tasks so)."""
        self._submit_listeners.append(listener)

    @property
    def connected(self) -> bool:
        """True while the websocket to the gateway is up (False while it reconnects)."""
        return not self._closed and self._link.connected

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def trusted_types(self) -> frozenset[str]:
        """Qualified names added with :meth:`trust_types`."""
        return frozenset(self._trusted)

    def gather(self, futures: Sequence[Future] | Future) -> Any:
        """The results, in order; raises the first error (as ``distributed`` does)."""
        if isinstance(futures, cf.Future):
            return futures.result()
        return [f.result() for f in futures]

    def cancel(self, futures: Iterable[Future]) -> None:
        for f in futures:
            f.cancel()

    def _cancel_keys(self, keys: list[str]) -> None:
        frame = p.encode(p.Cancel(keys=keys))
        self._loop.call_soon_threadsafe(self._link.send, frame)

    # ------------------------------------------------------------------ dask

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Dask's ``get`` scheduler interface: ``dask.compute(x, scheduler=client)``."""
        from notebook_ext import dask_integration

        return dask_integration.get(self, dsk, keys, **kwargs)

    def compute(self, collections: Any, **kwargs: Any) -> Any:
        """A future (or list of futures) for Dask collection(s), computed on the network."""
        from notebook_ext import dask_integration

        return dask_integration.compute(self, collections, **kwargs)

    def persist(self, collections: Any, **kwargs: Any) -> Any:
        """Collection(s) whose chunks are computed and kept on the providers."""
        from notebook_ext import dask_integration

        return dask_integration.persist(self, collections, **kwargs)

    # ------------------------------------------------------------------ asking

    def providers(self) -> list[ProviderInfo]:
        """The providers online now."""
        return [ProviderInfo.from_dict(d) for d in self._request("providers")]

    def balance(self) -> float:
        """This account's balance in tokens."""
        return float(self._request("balance"))

    def trust_types(self, *types: type | str) -> None:
        """Allow results that contain these exact types (besides the safe allow-list)."""
        for t in types:
            self._trusted.add(t if isinstance(t, str) else safe_pickle.qualified_name(t))

    def _request(self, what: str, args: dict | None = None, timeout: float = 30.0) -> Any:
        req_id = next(self._ids)
        reply: cf.Future = cf.Future()
        self._replies[req_id] = reply
        frame = p.encode(p.Query(id=req_id, what=what, args=args or {}))
        self._loop.call_soon_threadsafe(self._link.send, frame)
        try:
            msg: p.Reply = reply.result(timeout)
        finally:
            self._replies.pop(req_id, None)
        if msg.error:
            raise errors.GatewayRefused(msg.error)
        return msg.data

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _decode(self, buffers: list[memoryview], trust: bool) -> Any:
        # bytearray copies: arrays in results must be writable, as users expect
        writable = [buffers[0], *(bytearray(b) for b in buffers[1:])]
        return loads_result(writable, trust, self._trusted)

    # ------------------------------------------------------------------ incoming (loop thread)

    def _on_message(self, msg: p.Message, buffers: list[memoryview]) -> None:
        if isinstance(msg, p.Results):
            groups = p.split_buffers([r.nb for r in msg.results], buffers)
            for result, bufs in zip(msg.results, groups, strict=True):
                self._on_result(result, bufs)
        elif isinstance(msg, p.Events):
            for event in msg.events:
                self._on_event(event)
        elif isinstance(msg, p.Reply):
            reply = self._replies.get(msg.id)
            if reply is not None and not reply.done():
                reply.set_result(msg)
        elif isinstance(msg, p.Error):
            log.warning("gateway: %s: %s", msg.code, msg.message)

    def _on_result(self, result: p.Result, buffers: list[memoryview]) -> None:
        waiter = self._fetches.get(result.key)
        if waiter is not None and not waiter.done():  # the answer to a fetch
            if result.status == "finished":
                waiter.set_result(buffers)
            else:
                waiter.set_exception(rebuild_error(result.error, result.code))
            if result.key not in self._futures:
                return
        fut = self._futures.pop(result.key, None)
        if fut is None or fut.done():
            return
        fut.provider = result.provider or fut.provider
        fut.usage = dict(result.usage) or fut.usage
        fut.cost = result.cost
        fut.receipt = result.receipt
        if result.status == "finished":
            fut._remote_status = "finished"
            fut.nbytes = result.nbytes
            if result.stored and not result.nb:
                fut.set_result(StoredResult(result.key, result.nbytes))
            else:
                fut.set_result(RawResult(buffers))
        elif result.status == "cancelled":
            fut._cancel_locally()
        else:
            fut._remote_status = "error"
            fut.set_exception(rebuild_error(result.error, result.code))

    def _on_event(self, event: p.Event) -> None:
        fut = self._futures.get(event.key)
        if fut is None:
            return
        if event.kind == "running":
            fut._remote_status = "running"
            fut.provider = event.provider
        elif event.kind == "retrying":
            fut._remote_status = "pending"
            fut.provider = None
        elif event.kind == "usage":
            fut.usage = dict(event.usage or {})
            if event.cost is not None:
                fut.cost = event.cost
        elif event.kind == "output" and event.text:
            fut.output.append((event.stream or "stdout", event.text))
            if self.stream_output:
                stream = sys.stderr if event.stream == "stderr" else sys.stdout
                stream.write(event.text)

    def _on_resumed(self) -> None:
        """After a reconnect: fail the tasks the gateway no longer knows (it restarted)."""
        keys = [k for k, f in self._futures.items() if not f.done()]
        if not keys:
            return
        req_id = next(self._ids)
        reply: cf.Future = cf.Future()
        self._replies[req_id] = reply

        def check(done: cf.Future) -> None:
            self._replies.pop(req_id, None)
            for key in done.result().data.get("unknown", []):
                fut = self._futures.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_exception(errors.ProviderLost(
                        f"the gateway lost task {key} (it restarted); submit it again"))

        reply.add_done_callback(check)  # set on this loop thread, so it runs here too
        self._link.send(p.encode(p.Query(id=req_id, what="resume", args={"keys": keys})))

    def _on_lost(self, error: BaseException) -> None:
        for key, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_exception(ConnectionError(
                    f"lost the connection to {self.address} and could not reconnect: {error!r}"))
            self._futures.pop(key, None)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__).replace("<", "").replace(">", "")
