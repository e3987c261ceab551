"""Results kept on this provider for later tasks (Dask intermediates) and for fetches.

Values are the pickled result buffers exactly as the worker produced them: the provider never
unpickles them. A task that needs a key waits here until the gateway has delivered it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


class ResultStore:
    """key (task id) -> result buffers, with waiters for keys still on their way."""

    def __init__(self) -> None:
        self._data: dict[str, list[bytes]] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self.nbytes = 0

    def put(self, key: str, buffers: Sequence[bytes | memoryview]) -> None:
        if key in self._data:
            return
        data = [bytes(b) for b in buffers]
        self._data[key] = data
        self.nbytes += sum(len(b) for b in data)
        self._event(key).set()

    def get(self, key: str) -> list[bytes] | None:
        return self._data.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    async def wait(self, key: str) -> list[bytes]:
        """The key's buffers, once they are here."""
        await self._event(key).wait()
        return self._data[key]

    def release(self, key: str) -> None:
        data = self._data.pop(key, None)
        if data is not None:
            self.nbytes -= sum(len(b) for b in data)
        event = self._arrived.get(key)
        if event is not None and event.is_set():
            del self._arrived[key]

    def _event(self, key: str) -> asyncio.Event:
        event = self._arrived.get(key)
        if event is None:
            event = self._arrived[key] = asyncio.Event()
        return event
