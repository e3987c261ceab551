"""Salvaging an ``assign`` frame that failed validation: run what is sound, refuse the rest by
name (moved out of :mod:`provider.provider`, which calls it)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway import protocol as p

if TYPE_CHECKING:
    from provider.provider import Provider


def salvage_assign(data: bytes, provider: Provider,
                   tg: asyncio.TaskGroup) -> tuple[dict[str, str], int, str]:
    """From an ``assign`` frame that failed validation, start each task that is sound; return
    why each other task was refused (by key, for those short enough to name), how many could
    not be named, and what kind of frame it was."""
    try:
        header, buffers = p.decode_frame(data)
    except p.ProtocolError:
        return {}, 0, "undecodable"
    kind = header.get("t")
    tasks, funcs = header.get("tasks"), header.get("funcs", [])
    if kind != "assign" or not isinstance(tasks, list):
        return {}, 0, str(kind)[:32]
    nbs = [raw.get("nb") if isinstance(raw, dict) else None for raw in tasks]
    aligned = (isinstance(funcs, list) and all(isinstance(f, str) and len(f) <= 128
                                               for f in funcs)
               and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in nbs)
               and len(funcs) + sum(nbs) == len(buffers))
    specs: list[p.Assignment | None] = []
    refused: dict[str, str] = {}
    unnamed = 0
    for raw in tasks:
        key = raw.get("key") if isinstance(raw, dict) else None
        try:
            spec = p.Assignment.from_wire(raw) if isinstance(raw, dict) else None
            why = "it is not a map" if spec is None else (
                None if aligned else "the frame's buffers do not match its tasks")
        except p.ProtocolError as exc:
            spec, why = None, str(exc)
        if why is None:
            specs.append(spec)
            continue
        specs.append(None)
        if isinstance(key, str) and 0 < len(key) <= p.MAX_KEY_LEN:
            refused[key] = why
        else:
            unnamed += 1
    if aligned:
        for func_hash, blob in zip(funcs, buffers[: len(funcs)], strict=True):
            provider._funcs[func_hash] = bytes(blob)
        payloads = p.split_buffers(nbs, buffers[len(funcs):])
        for spec, task_payload in zip(specs, payloads, strict=True):
            if spec is not None:
                provider.take(spec, task_payload, tg)
    return refused, unnamed, "assign"
