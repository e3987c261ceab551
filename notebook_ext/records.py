"""The plain records the client API exchanges: a graph task going out, a provider coming back.

Kept apart from ``client`` because they are data, not connection logic: ``dask_integration``
builds :class:`GraphTask` values and the panel reads :class:`ProviderInfo` ones. ``client``
re-exports both, so ``from notebook_ext.client import GraphTask`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
    #: Its notable distributions (numpy, pandas, torch, ...): name -> version.
    packages: dict = field(default_factory=dict)
    #: Whether it builds environments for packages it lacks (``--install-packages``).
    installs: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> ProviderInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        extra = {k: v for k, v in data.items() if k not in cls.__dataclass_fields__}
        return cls(**known, extra=extra)
