"""Matching tasks to providers: who *may* run a task, and who *should* run it now.

Eligibility is a pure function of the task and the provider's advertisement; placement picks the
eligible provider with the most free room. Pending tasks wait in arrival order; a task no online
provider could ever take is reported at once rather than left waiting.
"""

from __future__ import annotations

import contextlib
from collections import deque

from gateway.protocol import TaskSpec
from gateway.registry import ProviderConn, Registry
from gateway.tasks import Task


def why_ineligible(spec: TaskSpec, account: str, provider: ProviderConn) -> str | None:
    """None if ``provider`` may run the task, else a short reason (for error messages)."""
    ad = provider.ad
    if spec.providers and provider.id not in spec.providers and ad.name not in spec.providers:
        return "not among the requested providers"
    if not spec.runtime.fits(ad.runtime):
        return f"runtime {ad.runtime} does not fit {spec.runtime}"
    if ad.allow and account not in ad.allow:
        return "provider does not accept this account"
    res = spec.resources
    if res.get("cpus", 1) > ad.cpus:
        return f"needs {res['cpus']} cpus, has {ad.cpus}"
    if res.get("memory", 0) > ad.memory:
        return f"needs {res['memory']} bytes of memory, has {ad.memory}"
    if res.get("gpus", 0) > ad.gpus:
        return f"needs {res['gpus']} gpus, has {ad.gpus}"
    if spec.max_price is not None and ad.prices.get("cpu", 0.0) > spec.max_price:
        return f"price {ad.prices.get('cpu')} above max_price {spec.max_price}"
    return None


def no_match_message(spec: TaskSpec, account: str, registry: Registry) -> str | None:
    """Why no provider online can ever run the task, or None if one can (or none is online)."""
    if not len(registry):
        return None
    reasons = {p.ad.name: why_ineligible(spec, account, p) for p in registry}
    if any(r is None for r in reasons.values()):
        return None
    detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:5])
    return (
        f"no online provider can run task {spec.key} ({detail}). Online runtimes: "
        f"{', '.join(registry.runtimes())}; the task needs {spec.runtime}. Relax the task's "
        f"resources/providers/max_price or start a fitting provider."
    )


class Scheduler:
    """FIFO of pending tasks and the placement of each onto a provider with free room."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.pending: deque[Task] = deque()

    def enqueue(self, task: Task, front: bool = False) -> None:
        (self.pending.appendleft if front else self.pending.append)(task)

    def discard(self, task: Task) -> None:
        with contextlib.suppress(ValueError):
            self.pending.remove(task)

    def place(self) -> list[tuple[ProviderConn, Task]]:
        """Assign as many pending tasks as providers have room for, in arrival order.

        A task nobody can take right now stays queued, but does not block the ones behind it.
        """
        providers = [p for p in self.registry if p.free > 0]
        if not providers or not self.pending:
            return []
        placed: list[tuple[ProviderConn, Task]] = []
        waiting: deque[Task] = deque()
        while self.pending and providers:
            task = self.pending.popleft()
            best = self._best(task, providers)
            if best is None:
                waiting.append(task)
                continue
            best.running.add(task.task_id)
            placed.append((best, task))
            if best.free <= 0:
                providers.remove(best)
        waiting.extend(self.pending)
        self.pending = waiting
        return placed

    @staticmethod
    def _best(task: Task, providers: list[ProviderConn]) -> ProviderConn | None:
        """The eligible provider with the most free room; untried ones first after a loss."""
        best, best_score = None, None
        for p in providers:
            if why_ineligible(task.spec, task.account, p) is not None:
                continue
            score = (p.id not in task.tried, p.free / p.capacity)
            if best_score is None or score > best_score:
                best, best_score = p, score
        return best
