"""Consistency checks of a map chunk's per-item fields (sans-I/O, pure): a chunk's spec and its
result's per-item outcomes. Moved out of :mod:`gateway.protocol`, which re-exports them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chunk_problem(items: int, parts: Sequence[int], nb: int, deps: list | None,
                  keep: bool) -> str | None:
    """Why a task's chunk fields do not fit together, or None.

    ``items`` 0 is a plain task (no ``parts``); a chunk of ``items`` runs the function on each
    item in turn, item ``i``'s argument stream being the next ``parts[i]`` of the ``nb``
    buffers. Graph tasks are never chunks."""
    if not items:
        return "parts is for chunks only (items > 0)" if parts else None
    if len(parts) != items:
        return f"a chunk of {items} items needs {items} parts, got {len(parts)}"
    if sum(parts) != nb:
        return f"a chunk's parts add up to {sum(parts)} buffers, but nb is {nb}"
    if deps is not None or keep:
        return "a graph task (deps, keep) cannot be a chunk"
    return None


def item_outcomes_problem(result: Any) -> str | None:
    """Why a result's per-item outcomes do not fit together (or its buffers), or None."""
    parts, failed = result.parts, result.failed
    if not parts:
        return "failed and errors are for chunk results only" if failed or result.errors else None
    if result.status != "finished":
        return f"a {result.status} result has no per-item outcomes (parts)"
    if result.stored:
        return "a chunk's result is never stored on its provider"
    if sum(parts) != result.nb:
        return f"parts add up to {sum(parts)} buffers, but nb is {result.nb}"
    if len(result.errors) != len(failed):
        return f"{len(failed)} failed items but {len(result.errors)} errors"
    last = -1
    for i in failed:
        if i <= last or i >= len(parts):
            return "failed must list item indexes in increasing order, each below the items"
        if parts[i]:
            return f"failed item {i} has result buffers"
        last = i
    return None
