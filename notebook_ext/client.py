"""``Client``: submit Python functions to decompute providers and get futures back.

The API follows ``distributed.Client`` (``submit``, ``map``, ``gather``, futures that feel
native), so habits carry over. The connection lives on the client's own event-loop thread; the
calling thread pickles arguments and decodes results, so neither blocks the other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import logging
import os
import secrets
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from gateway import protocol as p
from gateway.identity import Identity
from gateway.units import parse_size
from notebook_ext import by_value, errors, lifetime, requirements, safe_pickle, spot_checks
from notebook_ext.chunking import MAP_BATCH as MAP_BATCH
from notebook_ext.chunking import ChunkedMap
from notebook_ext.connection import GatewayLink
from notebook_ext.futures import Future
from notebook_ext.incoming import _GRAPH_SEP, Incoming  # noqa: F401  (re-exported)
from notebook_ext.money import Balance, refuse_unaffordable
from notebook_ext.pending import FirstFailures, LetGo, TaskBook
from notebook_ext.receipt_book import ReceiptBook, fetch_json
from notebook_ext.records import GraphTask, ProviderInfo  # noqa: F401  (re-exported)
from notebook_ext.refereed import Refereed
from notebook_ext.scatter import Scattering
from notebook_ext.serialize import (
    dumps_args,
    dumps_function,
    forget_pickles,
    loads_result,
    local_runtime,
)
from notebook_ext.transfers import Payments
from notebook_ext.zk import ZkMethods

log = logging.getLogger(__name__)

DEFAULT_GATEWAY = "ws://127.0.0.1:8765"
#: Longest a closing client waits for its last frames (the cancel) to be written.
DRAIN_SECONDS = 5.0
#: Keys per Release/Cancel frame sent for futures nobody holds any more.
LET_GO_BATCH = 10_000
#: Seconds ``balance()``, ``providers()`` and other questions wait for the gateway's answer.
QUERY_TIMEOUT = 30.0


class Client(ChunkedMap, Incoming, Payments, Refereed, Scattering, ZkMethods):
    """A connection to a decompute gateway, as this machine's identity.

    ``address`` defaults to ``$DECOMPUTE_GATEWAY``, else ``ws://127.0.0.1:8765``. ``trust=True``
    unpickles results without the allow-list (only if you trust every provider). ``timeout`` is
    the seconds the first connection may take; ``home`` the identity folder (default
    ``$DECOMPUTE_HOME``, else ``~/.decompute``).

    Outages: the client reconnects with backoff for as long as it is open (``status`` says
    reconnecting, then lost after 60 s) and logs one warning per outage. While the gateway is
    unreachable ``submit``/``map`` raise ``ConnectionError`` at once, unless
    ``queue_while_disconnected=True``: then tasks wait and are sent on reconnect. Tasks in flight
    keep waiting; when the gateway is back (even restarted on the same database) the ones it no
    longer knows are submitted again under the same session and keys, and paid once.
    ``reconnect_for`` (seconds, default None: never) fails the futures still waiting with
    ``ConnectionError`` after that long without a gateway; the client keeps reconnecting anyway.

    Endings: ``close()`` (or leaving ``with Client() as c:``, or the end of the script) cancels
    every task still running for this client; a future nobody holds any more is cancelled on
    the providers, as in Dask.
    """

    #: Dask asks this of any scheduler object named "Client": this one blocks (its own loop
    #: thread does the I/O), so it is synchronous from the caller's point of view.
    asynchronous = False

    def __init__(self, address: str | None = None, *, trust: bool = False, timeout: float = 30.0,
                 name: str = "", home: str | os.PathLike | None = None,
                 stream_output: bool = True, reconnect_for: float | None = None,
                 queue_while_disconnected: bool = False) -> None:
        self.address = address or os.environ.get("DECOMPUTE_GATEWAY") or DEFAULT_GATEWAY
        self.trust = trust
        self.stream_output = stream_output
        self.reconnect_for = reconnect_for
        self.queue_while_disconnected = queue_while_disconnected
        self.identity = Identity.load_or_create(home)
        self.session = secrets.token_hex(8)
        self.default_providers: list[str] | None = None
        self._trusted: set[str] = set()
        #: Warns once when a result comes from a provider with another numpy/pandas major.
        self._versions = requirements.ResultVersions(self._providers_off_loop)
        self._book = TaskBook(self._abandoned, self._reap_soon)
        self._submit_listeners: list[Callable[[list[Future]], None]] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._close_lock = threading.Lock()
        self._give_up: asyncio.TimerHandle | None = None
        self._warned = False
        self._let_go = LetGo(self._flush_let_go_soon)
        self._failures = FirstFailures()
        self._init_blobs()
        #: Seconds per item of each function, as its chunks ran (``chunksize="auto"``).
        self._per_item: dict[str, float] = {}
        self._slots: tuple[int, float] = (1, float("-inf"))  # slots online, when counted
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="decompute-client")
        self._thread.start()
        self._link = GatewayLink(self.address, self.identity, self.session, self._on_message,
                                 self._on_resumed, self._on_down, name)
        try:
            welcome = self._call(self._link.open(timeout), timeout + 5)
        except Exception as exc:
            self._closed = True
            self._stop_loop()
            raise ConnectionError(
                f"could not connect to the decompute gateway at {self.address}: {exc!r}. Is one "
                f"running? Start one with `decompute-gateway --local-providers 2`."
            ) from exc
        self.account: str = welcome.account
        self.gateway_key: str = welcome.gateway.hex()
        self._receipt_book = ReceiptBook(self.gateway_key, self.address)
        self.max_message: int = welcome.max_message
        self._shuffle_default = lifetime.opened(self)

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is still running for this client and close the connection.

        Safe at any moment and from any thread, any number of times; futures still waiting are
        cancelled (their ``result()`` raises ``CancelledError``), and the client's event loop is
        closed.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        pending = self._book.take_all()
        try:
            if pending:
                self._cancel_keys([f.key for f in pending], closing=True)
            self._call(self._drain_and_close(), timeout)
        except (TimeoutError, cf.TimeoutError, RuntimeError) as exc:
            log.warning("closing the connection to %s did not finish cleanly: %r",
                        self.address, exc)
        finally:
            self._stop_loop()
            for fut in pending:  # nobody will answer them now: never leave result() hanging
                fut._cancel_locally()
            self._book.fail_waiters(ConnectionError("this Client was closed"))
            self._receipt_book.close()  # its receipts stay readable and savable
            lifetime.closed(self, self._shuffle_default)

    async def _drain_and_close(self) -> None:
        if self._give_up is not None:
            self._give_up.cancel()
        await self._link.drain(DRAIN_SECONDS)  # the cancel of what still runs goes out first
        await self._link.close()

    def _stop_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def __repr__(self) -> str:
        account = getattr(self, "account", "")[:12]
        return f"<decompute.Client {self.address} account={account} {self.status}>"

    @property
    def status(self) -> str:
        """``connecting``, ``connected``, ``reconnecting`` (gateway unreachable, retrying),
        ``lost`` (unreachable for more than 60 s, still retrying with backoff) or ``closed``."""
        if self._closed:
            return "closed"
        return self._link.status(self._loop.time())

    @property
    def connected(self) -> bool:
        """True while the websocket to the gateway is up (False while it reconnects)."""
        return not self._closed and self._link.connected

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ submitting

    def submit(self, fn: Callable[..., Any], /, *args: Any, key: str | None = None,
               providers: Sequence[str] | None = None, resources: dict | None = None,
               max_price: float | None = None, budget: float | None = None,
               redundancy: int = 1, timeout: float | None = None, retries: int = 2,
               trust: bool | None = None, pure: bool | None = None,
               packages: Sequence[str] | None = None, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a provider; returns a :class:`Future` at once.

        Reserved keywords (as in Dask; every other keyword goes to ``fn``):

        - ``key``: the task's name (default ``"<fn name>-<uuid>"``); unique among running tasks.
        - ``providers``: only these providers (provider ids, account ids or names); default
          ``client.default_providers`` (the panel's choice), else any.
        - ``resources``: ``{"cpus": 1, "memory": "2GiB", "gpus": 0}`` (memory as bytes or a
          size string); default 1 CPU, the provider's memory share, no GPU.
        - ``max_price``: highest price accepted, tokens per CPU-second (default: any price).
        - ``budget``: the most this task may cost, tokens; it is held in escrow while it runs and
          the task stops with ``BudgetExceeded`` when it is used up (default: ``max_price`` x
          cpus x ``timeout``, else the gateway's default escrow).
        - ``redundancy``: replicas on distinct providers, majority result wins (default 1).
        - ``timeout``: seconds of run time before the task fails with ``TimeoutError``
          (default None: no limit).
        - ``retries``: times the task is re-run after its provider vanished (default 2).
        - ``trust``: decode this result without the allow-list (default: the client's
          ``trust``, False).
        - ``pure``: accepted for Dask compatibility; ignored.
        - ``packages``: PEP 508 requirements the provider must meet (``["scikit-learn>=1.5"]``);
          the client adds those it infers from the modules ``fn`` uses (``numpy>=2,<3``).
        - ``spot_check``, ``check``: see :mod:`notebook_ext.spot_checks` (``fut.verification``).

        Raises ``ConnectionError`` while the gateway is unreachable (unless the client was made
        with ``queue_while_disconnected=True``), ``GatewayRefused`` for a submission larger than
        the gateway accepts, and ``InsufficientFunds`` at once when ``budget`` x ``redundancy``
        exceeds the available balance; any other shortfall is known only to the gateway and
        raises ``InsufficientFunds`` from ``result()``.
        """
        opts = _opts(providers, resources, max_price, budget, redundancy, timeout, retries)
        checks = spot_checks.take(kwargs, opts, self)
        opts["packages"] = requirements.for_task(fn, packages, args, kwargs)
        self._check_ready()
        self._check_funds(opts, 1)
        func_hash, blob = dumps_function(fn)
        key = key or f"{_name(fn)}-{uuid.uuid4().hex}"
        spec, payload = self._task(key, func_hash, dumps_args(args, kwargs), opts)
        return self._send_tasks([spec], [payload], {func_hash: blob, **checks}, trust)[0]

    def map(self, fn: Callable[..., Any], /, *iterables: Iterable, key: str | Sequence[str]
            | None = None, providers: Sequence[str] | None = None,
            resources: dict | None = None, max_price: float | None = None,
            budget: float | None = None, redundancy: int = 1, timeout: float | None = None,
            retries: int = 2, trust: bool | None = None, pure: bool | None = None,
            chunksize: int | str = "auto", packages: Sequence[str] | None = None,
            **kwargs: Any) -> list[Future]:
        """``submit(fn, *items, **kwargs)`` for each item of ``zip(*iterables)``, in order.

        Batched on the wire (one frame per 1,000 tasks). ``key`` is a list of keys (one per
        task) or a prefix (keys become ``"<prefix>-<i>"``; default ``"<fn name>-<random>"``).
        Every other reserved keyword is :meth:`submit`'s, with the same units and defaults
        (``budget`` and ``timeout`` are per item). Raises as :meth:`submit` does, before anything
        is sent; ``InsufficientFunds`` at once when ``budget`` x ``redundancy`` x tasks exceeds
        the available balance.

        ``chunksize``: items run as one remote task (one escrow, one process hand-off, one
        settlement), each item keeping its own future, result, error, cancel, cost share and
        receipt. ``"auto"`` (default) makes at least 4 chunks per provider slot online, and once
        this function's run time is known, chunks of about 50 ms of work (at most 256 items);
        ``1`` runs each item as its own task. A chunk's items share one output stream (each
        item's ``output`` holds the chunk's), and ``timeout`` applies to a chunk as ``timeout``
        x its items. Chunks need a gateway that runs them; otherwise each item is its own task.
        """
        opts = _opts(providers, resources, max_price, budget, redundancy, timeout, retries)
        checks = spot_checks.take(kwargs, opts, self)
        self._check_ready()
        items = list(zip(*iterables, strict=False))
        opts["packages"] = requirements.for_task(fn, packages, items[0] if items else (), kwargs)
        self._check_funds(opts, len(items))
        func_hash, blob = dumps_function(fn)
        prefix = key if isinstance(key, str) else f"{_name(fn)}-{uuid.uuid4().hex[:12]}"
        keys = key if key is not None and not isinstance(key, str) else None
        size = 1 if opts["spot_check"] else self._chunk_size(chunksize, func_hash, len(items))
        if size > 1:
            task_keys = [keys[i] if keys is not None else f"{prefix}-{i}"
                         for i in range(len(items))]
            return self._map_chunks(func_hash, blob, items, kwargs, task_keys, size, opts, trust)
        futures: list[Future] = []
        for start in range(0, len(items), MAP_BATCH):
            specs, payloads = [], []
            for i, item in enumerate(items[start:start + MAP_BATCH], start):
                task_key = keys[i] if keys is not None else f"{prefix}-{i}"
                spec, payload = self._task(task_key, func_hash, dumps_args(item, kwargs), opts)
                specs.append(spec)
                payloads.append(payload)
            futures += self._send_tasks(specs, payloads, {func_hash: blob, **checks}, trust)
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
        self._check_ready()
        send = set(send)
        trust = opts.pop("trust", None)
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
            batch = self._send_tasks(specs, payloads, blobs, trust)
            futures.update((f.key, f) for f in batch)
        for key, fut in futures.items():
            weakref.finalize(fut, self._release_key, key)
        return futures

    def _release_key(self, key: str) -> None:
        """A kept result's future was collected: the providers may free it (GC thread)."""
        self._let_go.add(key, release=True)

    def _abandoned(self, key: str, keep: bool) -> None:
        """A task's future was collected before it ended: nobody can want its result."""
        if not keep:  # graph tasks are released by their finalizer, once no dependent needs them
            self._let_go.add(key, release=False)

    def _reap_soon(self) -> None:
        """Futures were collected (called from a GC callback): forget them on the loop."""
        self._on_loop(self._book.reap)

    def _flush_let_go_soon(self) -> None:
        self._on_loop(self._flush_let_go)

    def _on_loop(self, callback: Callable[[], None]) -> None:
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(callback)

    def _flush_let_go(self) -> None:
        """Loop thread: send the queued releases and cancels, batched."""
        releases, cancels = self._let_go.take()
        for keys, message in ((releases, p.Release), (cancels, p.Cancel)):
            for start in range(0, len(keys), LET_GO_BATCH):
                self._link.send(p.encode(message(keys=keys[start:start + LET_GO_BATCH])))

    def _send_soon(self, frame: bytes, *, closing: bool = False) -> None:
        """Queue a frame for the loop thread; a no-op once the client is closed (except the
        last frames ``close`` sends)."""
        if self._closed and not closing:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._link.send, frame)

    def _fetch(self, key: str, timeout: float | None) -> list[memoryview]:
        """The bytes of a result kept on a provider."""
        waiter, ask = self._book.fetch_waiter(key)
        if ask:
            self._send_soon(p.encode(p.Fetch(keys=[key])))
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
            redundancy=opts.get("redundancy", 1), packages=opts.get("packages") or [],
            spot_check=opts.get("spot_check", 0.0), check=opts.get("check"))
        return spec, payload

    def _check_ready(self) -> None:
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        if not self._link.connected and not self.queue_while_disconnected:
            raise ConnectionError(
                f"the decompute gateway at {self.address} is unreachable (status "
                f"{self.status}); the client keeps reconnecting. Submit again once "
                f"client.status is 'connected', or create the client with "
                f"queue_while_disconnected=True to queue tasks until then")

    def _check_funds(self, opts: dict, n: int) -> None:
        """Refuse at once what the balance cannot cover when the cost bound is known."""
        budget = opts.get("budget")
        if budget is None or n == 0 or not self._link.connected:
            return
        refuse_unaffordable(self.balance(), budget, n, opts.get("redundancy") or 1, self.account)

    def _send_tasks(self, specs: list[p.TaskSpec], payloads: list[list], funcs: dict[str, bytes],
                    trust: bool | None, make: type[Future] = Future) -> list[Future]:
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        specs, payloads = self._with_blobs(specs, payloads)
        frame = self._submit_frame(specs, payloads, funcs)
        trust = self.trust if trust is None else trust
        futures = [make(self, spec.key, trust) for spec in specs]
        self._track_arguments(futures, specs)
        self._book.add(futures, specs, payloads, funcs)
        self._send_soon(frame)
        for listener in self._submit_listeners:
            listener(futures)
        return futures

    def _submit_frame(self, specs: list[p.TaskSpec], payloads: list[list],
                      funcs: dict[str, bytes]) -> bytes:
        frame = p.encode_parts(p.Submit(tasks=specs, funcs=list(funcs)),
                               [*funcs.values(), *(b for payload in payloads for b in payload)])
        size = p.frame_size(frame)
        if self.max_message and size > self.max_message:
            raise errors.GatewayRefused(
                f"this submission is too large: {size:,} bytes, but the gateway at {self.address} "
                f"accepts "
                f"messages up to {self.max_message:,} bytes; pass smaller arguments (or split a "
                f"map into smaller ones); nothing was sent")
        return frame

    def on_submit(self, listener: Callable[[list[Future]], None]) -> None:
        """Call ``listener(futures)`` with each batch of new futures (the panel tracks tasks so)."""
        self._submit_listeners.append(listener)

    @property
    def trusted_types(self) -> frozenset[str]:
        """Qualified names added with :meth:`trust_types`."""
        return frozenset(self._trusted)

    def gather(self, futures: Sequence[Future] | Future) -> Any:
        """The results, in order; raises the first error (as ``distributed`` does).

        Ctrl-C while waiting cancels every task of ``futures`` not finished yet and raises a
        plain ``KeyboardInterrupt``.
        """
        if isinstance(futures, cf.Future):
            return futures.result()
        futures = list(futures)
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            self.cancel(futures)
            raise KeyboardInterrupt("interrupted while gathering results; the remote tasks "
                                    "not finished yet were cancelled") from None

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel these tasks (one message); running ones have their remote process killed."""
        waiting = [f for f in futures if isinstance(f, Future) and not f.done()]
        for f in waiting:
            f._cancel_locally()
        chunks = {id(f._chunk): f._chunk for f in waiting if f._chunk is not None}
        keys = [f.key for f in waiting if f._chunk is None]
        keys += [c.key for c in chunks.values() if c.all_cancelled()]
        if keys:
            self._cancel_keys(keys)

    def _cancel_keys(self, keys: list[str], *, closing: bool = False) -> None:
        for start in range(0, len(keys), LET_GO_BATCH):  # the wire's list limit
            self._send_soon(p.encode(p.Cancel(keys=keys[start:start + LET_GO_BATCH])),
                            closing=closing)

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

    def ship_module(self, module: types.ModuleType) -> None:
        """Make ``module``'s functions and classes travel by value (their code goes with each
        task), for a module of yours the automatic rule takes for an installed one;
        ``notebook_ext.travels_by_value(module)`` says which way a module travels."""
        by_value.ship_module(module)
        forget_pickles()

    # ------------------------------------------------------------------ asking

    def providers(self) -> list[ProviderInfo]:
        """The providers online now."""
        return [ProviderInfo.from_dict(d) for d in self._request("providers")]

    def balance(self) -> Balance:
        """This account's tokens: a float of what is available, with ``.available`` and
        ``.held`` (escrow held by this account's open tasks)."""
        return Balance.from_reply(self._request("balance"))

    def receipts(self) -> list[dict]:
        """Every settlement receipt this client holds, oldest first (``verify_receipt`` and
        ``decompute-audit`` check them). Raises ``ForkDetected`` if the gateway's log forked."""
        self._receipt_book.check()
        return self._receipt_book.receipts()

    def save_receipts(self, path: str | os.PathLike) -> int:
        """Write :meth:`receipts` to ``path`` as JSON lines (``decompute-audit PATH`` reads it);
        returns how many."""
        self._receipt_book.check()
        return self._receipt_book.save(path)

    def check_log(self, timeout: float = 30.0) -> None:
        """Fetch the gateway's ``/log/head`` and check it, and every head seen in receipts so far,
        against the newest head seen: ``ForkDetected`` names both heads if the log forked."""
        self._receipt_book.check(timeout)
        self._receipt_book.observe(fetch_json(f"{self._receipt_book.base}/log/head"))

    def trust_types(self, *types: type | str) -> None:
        """Allow results that contain these exact types (besides the safe allow-list).

        Works for classes defined in a script or notebook (``__main__``) too: such a result
        arrives as a reference to the class by name, and this client resolves that name to the
        very class you passed.
        """
        for t in types:
            name = t if isinstance(t, str) else safe_pickle.qualified_name(t)
            self._trusted.add(name)

    def _request(self, what: str, args: dict | None = None,
                 timeout: float = QUERY_TIMEOUT) -> Any:
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        if not self._link.connected:
            raise ConnectionError(
                f"cannot ask the gateway at {self.address} for {what}: it is unreachable "
                f"(status {self.status}); the client keeps reconnecting, try again later")
        req_id = next(self._ids)
        reply = self._book.expect_reply(req_id)
        self._send_soon(p.encode(p.Query(id=req_id, what=what, args=args or {})))
        try:
            msg: p.Reply = reply.result(timeout)
        except cf.TimeoutError:
            raise ConnectionError(
                f"the gateway at {self.address} did not answer {what!r} within {timeout:g} s "
                f"(status {self.status}); it may be overloaded or restarting, try again") from None
        finally:
            self._book.drop_reply(req_id)
        if msg.error:
            raise errors.GatewayRefused(msg.error)
        return msg.data

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _providers_off_loop(self) -> list[ProviderInfo]:
        """``providers()``, refused on the client's loop thread (a done-callback calling
        ``result()``): waiting for a reply there would stall the loop that brings it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("on the client's loop thread")
        return self.providers()

    def _decode(self, buffers: list[memoryview], trust: bool, provider: str | None = None) -> Any:
        # bytearray copies: arrays in results must be writable, as users expect
        writable = [buffers[0], *(bytearray(b) for b in buffers[1:])]
        value = loads_result(writable, trust, self._trusted)
        self._versions.check(provider)
        return value


def _opts(providers: Sequence[str] | None, resources: dict | None, max_price: float | None,
          budget: float | None, redundancy: int, timeout: float | None, retries: int) -> dict:
    """The reserved keywords as ``_task`` reads them (absent ``providers``: the default)."""
    opts: dict[str, Any] = {"resources": resources, "max_price": max_price, "budget": budget,
                            "redundancy": redundancy, "timeout": timeout, "retries": retries}
    if providers is not None:
        opts["providers"] = providers
    return opts


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__).replace("<", "").replace(">", "")
