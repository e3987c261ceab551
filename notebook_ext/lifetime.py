"""Process-wide duties of open clients: close them when the interpreter exits, and keep Dask's
shuffle default right while any is open.

Nothing here runs at import beyond registering one ``atexit`` hook; Dask is imported only when a
client opens (and only if installed), and its configuration is restored when the last closes.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import threading
import weakref
from typing import Any, Protocol


class _Closable(Protocol):
    def close(self, timeout: float = ...) -> None: ...


#: Open clients, closed at interpreter exit so a script that ends cancels its tasks.
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()
_SHUFFLE_KEY = "dataframe.shuffle.method"
#: The ``dask.config.set`` that made task shuffles the default, while open clients use it.
_shuffle_setting: list[Any] = []
_shuffle_users = 0
_shuffle_lock = threading.Lock()


def opened(client: _Closable) -> bool:
    """A client is open: close it at exit; returns whether it uses the task-shuffle default."""
    _OPEN.add(client)
    return _prefer_task_shuffle()


def closed(client: _Closable, uses_shuffle_default: bool) -> None:
    _OPEN.discard(client)
    _restore_shuffle(uses_shuffle_default)


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN):
        with contextlib.suppress(Exception):
            client.close(timeout=3.0)


def _prefer_task_shuffle() -> bool:
    """While a client is open, Dask shuffles through tasks unless the user chose a method, as
    with ``distributed.Client``: a disk shuffle cannot span providers, and Dask picks the method
    when a collection is optimized, before any scheduler sees it. Never at import; undone when
    the last client closes."""
    global _shuffle_users
    if importlib.util.find_spec("dask") is None:
        return False
    import dask.config

    with _shuffle_lock:
        if _shuffle_users == 0:
            if dask.config.get(_SHUFFLE_KEY, None) is not None:
                return False
            _shuffle_setting.append(dask.config.set({_SHUFFLE_KEY: "tasks"}))
        _shuffle_users += 1
        return True


def _restore_shuffle(counted: bool) -> None:
    """The last open client closed: Dask's shuffle setting is what it was before."""
    global _shuffle_users
    if not counted:
        return
    with _shuffle_lock:
        _shuffle_users -= 1
        if _shuffle_users == 0 and _shuffle_setting:
            _shuffle_setting.pop().__exit__(None, None, None)
