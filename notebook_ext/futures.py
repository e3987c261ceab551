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
from collections.abc import Iterable, Iterator
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
        self.output: list[tuple[str, str]] = []
        self.nbytes = 0
        self._remote_status = "pending"
        self._decoded: list[Any] = []
        self._decode_lock = threading.Lock()

    # --------------------------------------------------------------- state

    @property
    def status(self) -> str:
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "error" if super().exception() is not None else "finished"
        return self._remote_status

    def cancel(self) -> bool:
        """Cancel the task; if it runs, its remote process is killed."""
        if self.done():
            return False
        self.client._cancel_keys([self.key])
        return self._cancel_locally()

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
                self._decoded.append(self.client._decode(buffers, self.trust))
            return self._decoded[0]

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


def as_completed(futures: Iterable[cf.Future], timeout: float | None = None) -> Iterator[Future]:
    """Yield futures as they complete, in completion order (as ``distributed.as_completed``)."""
    return cf.as_completed(list(futures), timeout=timeout)  # type: ignore[return-value]


def wait(futures: Iterable[cf.Future], timeout: float | None = None,
         return_when: str = "ALL_COMPLETED") -> cf._base.DoneAndNotDoneFutures:
    """``(done, not_done)`` sets once ``return_when`` holds or ``timeout`` passes."""
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError("return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION")
    return cf.wait(list(futures), timeout=timeout, return_when=return_when)

