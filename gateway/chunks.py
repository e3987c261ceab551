"""Chunks of a ``map``: one gateway task that runs the function on several small items.

Pure helpers the gateway core calls (no I/O, no state). A chunk is one task in every way that
costs the gateway work (one escrow, one assignment, one result frame, one settlement, one receipt
leaf); what it adds is per item: its spec's ``items``/``parts`` say where each item's argument
stream lies, its provider's result says how each item ended (:class:`gateway.protocol.Result`),
and its leaf lists each item's result hash (:func:`item_hashes`), so an item's receipt is the
chunk's receipt plus the item's index (:func:`gateway.receipt_log.check_item_result`).

How the core uses them:

- ``Welcome(..., features=FEATURES)``: clients send chunks only to a gateway that says so.
- ``Assignment(..., **assignment_fields(task.spec))``: the provider must know it runs a chunk.
- ``result_problem(task.spec.items, result)`` on each provider result: a chunk answered with
  another item count (or a plain task answered per item) is a bad result.
- ``escrow_items(spec)``: the default escrow (no budget, no max_price x timeout) is per item.
- ``item_hashes(result, buffers)`` -> ``settlement_entry(..., items=...)``; ``outcome_hash``
  for the leaf's ``outcome`` and the redundancy votes (it covers the failed items too).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.billing import failure_hash, result_hash
from gateway.protocol import MAX_ITEMS, Result, TaskSpec

__all__ = ["FEATURES", "MAX_ITEMS", "assignment_fields", "escrow_items", "item_hashes",
           "item_result", "outcome_hash", "result_problem"]

#: What a gateway that wires these helpers advertises in its ``Welcome``.
FEATURES = ["chunks"]


def assignment_fields(spec: TaskSpec) -> dict:
    """The chunk fields of a spec as its ``Assignment`` carries them (empty for a plain task)."""
    return {"items": spec.items, "parts": list(spec.parts)} if spec.items else {}


def escrow_items(spec: TaskSpec) -> int:
    """How many items the default escrow of this task must cover (1 for a plain task).

    A client that names a ``budget`` sends it per chunk already (per-item budget x items), and
    a chunk's ``timeout`` is per chunk too, so only the gateway's default escrow multiplies."""
    return max(1, spec.items)


def result_problem(items: int, result: Result) -> str | None:
    """Why a provider's result does not answer its assignment of ``items`` items, or None.

    Per-item outcomes that do not fit together are refused by the protocol already
    (:func:`gateway.protocol.item_outcomes_problem`); this checks them against what was
    assigned. Only a ``finished`` chunk carries per-item outcomes."""
    if result.status != "finished":
        return None
    if items and result.items != items:
        return (f"the provider answered a chunk of {items} items with {result.items} item "
                f"outcomes")
    if not items and result.items:
        return f"the provider answered a plain task with {result.items} item outcomes"
    return None


def item_result(result: Result, buffers: Sequence[memoryview], i: int
                ) -> tuple[list[memoryview], Result | None]:
    """Item ``i``'s result buffers, and its failure as an error ``Result`` (None if it ran)."""
    if i in result.failed:
        err = result.errors[result.failed.index(i)]
        return [], Result(key=result.key, status="error", error=err)
    start = sum(result.parts[:i])
    return list(buffers[start:start + result.parts[i]]), None


def item_hashes(result: Result, buffers: Sequence[memoryview]) -> list[str] | None:
    """Each item's result hash, in order (None for a result without per-item outcomes):
    :func:`gateway.billing.result_hash` of its buffers, or for an item that raised,
    :func:`gateway.billing.failure_hash` of its error."""
    if not result.parts:
        return None
    failed = dict(zip(result.failed, result.errors, strict=True))
    out, pos = [], 0
    for i, n in enumerate(result.parts):
        err = failed.get(i)
        if err is not None:
            out.append(failure_hash(Result(key=result.key, status="error", error=err)))
        else:
            out.append(result_hash(buffers[pos:pos + n]))
        pos += n
    return out


def outcome_hash(result: Result, buffers: Sequence[memoryview]) -> str:
    """One hash of a task's whole outcome: a plain result's (or a failed chunk's) as today; a
    chunk's covers every item's hash, so replicas that differ in one item's error disagree."""
    hashes = item_hashes(result, buffers)
    if hashes is None:
        return result_hash(buffers) if result.status == "finished" else failure_hash(result)
    return result_hash([memoryview(bytes.fromhex(h)) for h in hashes])
