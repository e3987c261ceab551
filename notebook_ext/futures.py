"""Futures for remote tasks: ``concurrent.futures.Future`` subclasses that are also awaitable.

A result arrives as raw buffers and is decoded by the safe-result unpickler only when the user
asks for it (``result()``), in the user's thread: the client's event loop never unpickles, and a
result the allow-list refuses raises :class:`UntrustedResultError` at the point of use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import html
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from notebook_ext.money import Receipt

if TYPE_CHECKING:
    from notebook_ext.client import Client


@dataclass(slots=True)
class RawResult:
    """A finished task's result buffers, not yet unpickled."""

    buffers: list[memoryview]


@dataclass(slots=True)
class StoredResult:
    """A finished task whose result stayed on its provider; ``result()`` fetches it."""

    key: str
    nbytes: int


class Future(cf.Future):
    """A remote task's future.

    ``status`` is one of pending, running, finished, error, cancelled. ``usage`` and ``cost``
    update live while the task runs; ``receipt`` is the gateway's signed settlement record.
    """

    def __init__(self, client: Client, key: str, trust: bool = False) -> None:
        super().__init__()
        self.client = client
        self.key = key
        self.trust = trust
        self.provider: str | None = None
        self.usage: dict[str, float] = {}
        self.cost: float = 0.0
        self.receipt: dict | None = None
        #: What was checked before the result was accepted (spot check, referee, proof, vote);
        #: None if nothing beyond the provider's word.
        self.verification: dict | None = None
        self.output: list[tuple[str, str]] = []
        self.nbytes = 0
        self._remote_status = "pending"
        self._decoded: list[Any] = []
        self._decode_lock = threading.Lock()
        #: The chunk of a ``map`` this item runs in (None: a task of its own), and its index.
        self._chunk: Chunk | None = None
        self._item = 0

    # --------------------------------------------------------------- state

    @property
    def status(self) -> str:
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "error" if super().exception() is not None else "finished"
        return self._remote_status

    def cancel(self) -> bool:
        """Cancel the task; if it runs, its remote process is killed. An item of a chunked
        ``map`` is cancelled here at once; its chunk is cancelled on the providers once every
        item of it is."""
        if self.done():
            return False
        if self._chunk is None:
            self.client._cancel_keys([self.key])
            return self._cancel_locally()
        cancelled = self._cancel_locally()
        if self._chunk.all_cancelled():
            self.client._cancel_keys([self._chunk.key])
        return cancelled

    def _cancel_locally(self) -> bool:
        """Cancelled, and said so to ``wait``/``as_completed`` waiters (which ``cancel`` alone
        does not do for a future that never ran locally). Atomic and idempotent: the user's
        ``cancel()`` and the gateway's "cancelled" answer may race from two threads."""
        with self._condition:  # an RLock: the base methods below take it again
            if not super().cancel():
                return False
            if self._state == cf._base.CANCELLED:
                self.set_running_or_notify_cancel()
            return True

    # The methods below are how the client's loop thread changes a future: the future owns its
    # fields, and each change happens under its own lock so readers never see half of one.

    def _started(self, provider: str | None) -> None:
        with self._condition:
            if not self.done():
                self._remote_status = "running"
                self.provider = provider or self.provider

    def _requeued(self) -> None:
        with self._condition:
            if not self.done():
                self._remote_status = "pending"
                self.provider = None

    def _metered(self, usage: dict | None, cost: float | None) -> None:
        with self._condition:
            self.usage = dict(usage or {})
            if cost is not None:
                self.cost = cost

    def _printed(self, stream: str, text: str) -> None:
        with self._condition:
            self.output.append((stream, text))  # a list: readers iterating it never break

    def _settled(self, provider: str | None, usage: dict | None, cost: float,
                 receipt: dict | None) -> None:
        """The gateway's final word on where it ran and what it cost (any outcome)."""
        with self._condition:
            self.provider = provider or self.provider
            self.usage = dict(usage or {}) or self.usage
            self.cost = cost
            self.receipt = Receipt(receipt) if receipt else None

    def _finish(self, value: Any, nbytes: int = 0) -> bool:
        with self._condition:
            if self.done():
                return False
            self._remote_status = "finished"
            self.nbytes = nbytes
            self.set_result(value)
            return True

    def _fail(self, exc: BaseException) -> bool:
        with self._condition:
            if self.done():
                return False
            self._remote_status = "error"
            self.set_exception(exc)
            return True

    #: Lets Dask recognise a decompute future inside a graph (as it does distributed's).
    __dask_future__ = True

    def result(self, timeout: float | None = None) -> Any:
        """The task's value (decoded through the safe-result allow-list on first call).

        Ctrl-C while waiting cancels the remote task and raises a plain ``KeyboardInterrupt``.
        """
        try:
            raw = super().result(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise KeyboardInterrupt(f"interrupted while waiting for {self.key}; the remote "
                                    f"task was cancelled") from None
        except cf.TimeoutError:
            if self.done():
                raise  # the task's own TimeoutError (its timeout= ran out), not this wait's
            raise TimeoutError(f"task {self.key} did not finish within {timeout} s (status "
                               f"{self.status}, gateway {self.client.status}); it keeps "
                               f"running: call result() again or cancel() it") from None
        if not isinstance(raw, (RawResult, StoredResult)):
            return raw
        with self._decode_lock:
            if not self._decoded:
                buffers = (raw.buffers if isinstance(raw, RawResult)
                           else self.client._fetch(raw.key, timeout))
                self._decoded.append(self.client._decode(buffers, self.trust, self.provider))
            return self._decoded[0]

    def raw_buffers(self, timeout: float | None = None) -> list[memoryview]:
        """The result's bytes as they arrived, not unpickled: what its receipt's result hash
        covers (``verify_receipt(fut.receipt, key, result=fut.raw_buffers())``)."""
        raw = super().result(timeout)
        if not isinstance(raw, RawResult):
            raise ValueError(f"task {self.key}'s result stayed on its provider; its bytes are "
                             f"fetched by result()")
        return list(raw.buffers)

    def __await__(self):
        # Wait for completion without copying the result into an asyncio future (that would
        # decode it inside a loop callback, where a decode error is only logged); decode after.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake(_: cf.Future) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

        self.add_done_callback(wake)
        yield from waiter.__await__()
        return self.result()

    # --------------------------------------------------------------- display

    def __repr__(self) -> str:
        where = f" on {self.provider}" if self.provider else ""
        return f"<decompute.Future {self.key} {self.status}{where}>"

    def _repr_html_(self) -> str:
        colour = {"finished": "green", "error": "red", "cancelled": "grey"}.get(self.status,
                                                                                "orange")
        cpu = self.usage.get("cpu_seconds", 0.0)
        return (f"<b>Future</b> {html.escape(self.key)} <span style='color:{colour}'>"
                f"{self.status}</span> provider={html.escape(str(self.provider))} "
                f"cpu={cpu:.2f}s cost={self.cost:.3g} tokens")


def split_micro(cost: float, n: int) -> list[float]:
    """``cost`` (tokens) split over ``n`` items in whole micro-tokens, the ledger's unit: the
    first ``remainder`` items pay one micro-token more, so the parts add up to the charge."""
    base, extra = divmod(round(cost * 1_000_000), n)
    return [(base + (i < extra)) / 1_000_000 for i in range(n)]


class Chunk:
    """The items of a chunked ``map`` that run as one gateway task (key ``key``).

    The client's books hold it (weakly) in place of a future: what the gateway says of the task
    (running, usage, output, its result) is passed on to each item's own future. It holds its
    items weakly and they hold it, so it lives as long as someone holds one of its items; once
    none does, the books see it collected and cancel the task, as for a dropped future.
    """

    __slots__ = ("__weakref__", "func", "key", "n", "_items", "_cancel_sent")

    def __init__(self, key: str, func: str, items: Sequence[Future]) -> None:
        self.key = key
        self.func = func
        self.n = len(items)
        self._items = [weakref.ref(f) for f in items]
        self._cancel_sent = False
        for i, fut in enumerate(items):
            fut._chunk, fut._item = self, i

    def live(self) -> list[Future]:
        """The item futures someone still holds, in item order."""
        return [f for f in (r() for r in self._items) if f is not None]

    def done(self) -> bool:
        return all(f.done() for f in self.live())

    def all_cancelled(self) -> bool:
        """True once (and only the first time) every item still held is cancelled: then the
        chunk itself is cancelled on the gateway."""
        if self._cancel_sent or not all(f.cancelled() for f in self.live()):
            return False
        self._cancel_sent = True
        return True

    # What the gateway says of the task, passed on to every item (loop thread).

    def _started(self, provider: str | None) -> None:
        for f in self.live():
            f._started(provider)

    def _requeued(self) -> None:
        for f in self.live():
            f._requeued()

    def _metered(self, usage: dict | None, cost: float | None) -> None:
        share = {k: v / self.n for k, v in (usage or {}).items()}
        costs = split_micro(cost, self.n) if cost is not None else None
        for f in self.live():
            f._metered(share, None if costs is None else costs[f._item])

    def _printed(self, stream: str, text: str) -> None:
        """A chunk's items print into one stream (they ran in one process, one after another):
        each item's ``output`` holds the chunk's."""
        for f in self.live():
            f._printed(stream, text)

    def _settled(self, provider: str | None, usage: dict | None, cost: float,
                 receipt: dict | None) -> None:
        """Each item's share: the usage and cost split evenly (:func:`split_micro`), and the
        chunk's receipt with the item's index (``verify_receipt`` checks it)."""
        share = {k: v / self.n for k, v in (usage or {}).items()}
        costs = split_micro(cost, self.n)
        for f in self.live():
            f._settled(provider, share, costs[f._item],
                       dict(receipt, item=f._item) if receipt else None)

    def _cancel_locally(self) -> bool:
        return any([f._cancel_locally() for f in self.live()])

    def _fail(self, exc: BaseException) -> bool:
        return any([f._fail(exc) for f in self.live()])


def as_completed(futures: Iterable[cf.Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield futures as they complete, in completion order (as ``distributed.as_completed``)."""
    return cf.as_completed(list(futures), timeout=timeout)  # type: ignore[return-value]


def wait(futures: Iterable[cf.Future], timeout: float | None = None,
         return_when: str = "ALL_COMPLETED") -> cf._base.DoneAndNotDoneFutures:
    """``(done, not_done)`` sets once ``return_when`` holds or ``timeout`` passes."""
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError("return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION")
    return cf.wait(list(futures), timeout=timeout, return_when=return_when)

