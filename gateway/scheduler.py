"""Matching tasks to providers: who *may* run a task, and who *should* run it now.

Eligibility is a pure function of the task and the provider's advertisement; placement picks the
eligible provider with the most free room. Pending tasks wait in arrival order; a task no online
provider could ever take is reported at once rather than left waiting.
"""

from __future__ import annotations

import contextlib
from collections import deque

from gateway.graph import Graph
from gateway.protocol import TaskSpec
from gateway.registry import ProviderConn, Registry
from gateway.tasks import Task, TaskState


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


#: Bytes a second a transfer between providers is assumed to take through the gateway.
TRANSFER_BYTES_PER_S = 300e6
#: Pending tasks examined per placement round when the best providers are busy: bounds the cost
#: of one round on a long queue (the rest are looked at in later rounds).
SCAN_LIMIT = 2_000


class Scheduler:
    """Pending tasks and their placement onto providers, weighing data locality against waiting.

    As distributed's ``worker_objective``: a provider's cost for a task is the time to move the
    task's inputs it lacks plus the expected wait for a free slot; the cheapest eligible provider
    wins. If that provider is full, the task waits for it rather than moving data elsewhere.
    """

    def __init__(self, registry: Registry, graph: Graph) -> None:
        self.registry = registry
        self.graph = graph
        self.pending: deque[Task] = deque()
        self._queued: set[str] = set()  # task ids in ``pending``: a task is queued once
        #: Moving average of task run time, the unit of expected waiting.
        self.avg_duration = 0.05

    def enqueue(self, task: Task, front: bool = False) -> None:
        if task.task_id in self._queued:
            return
        self._queued.add(task.task_id)
        (self.pending.appendleft if front else self.pending.append)(task)

    def discard(self, task: Task) -> None:
        if task.task_id in self._queued:
            self._queued.discard(task.task_id)
            with contextlib.suppress(ValueError):
                self.pending.remove(task)

    def observe(self, seconds: float) -> None:
        self.avg_duration = 0.9 * self.avg_duration + 0.1 * max(seconds, 1e-4)

    def place(self) -> list[tuple[ProviderConn, Task]]:
        """Assign pending tasks to providers with room, in queue order; the rest keep waiting."""
        providers = list(self.registry)
        if not self.pending or not any(p.free > 0 for p in providers):
            return []
        placed: list[tuple[ProviderConn, Task]] = []
        skipped: list[Task] = []
        while self.pending and len(skipped) < SCAN_LIMIT and any(p.free > 0 for p in providers):
            task = self.pending.popleft()
            self._queued.discard(task.task_id)
            if task.state is not TaskState.PENDING or (
                    task.spec.deps is not None and not self.graph.ready(task.task_id)):
                continue  # ended meanwhile, or waits for inputs (requeued once they exist)
            best = self._best(task, providers)
            if best is None or best.free <= 0:
                skipped.append(task)
                continue
            best.running.add(task.task_id)
            placed.append((best, task))
            for sibling in task.siblings:  # replicas must land on distinct providers
                sibling.avoid.add(best.id)
        self.pending.extendleft(reversed(skipped))  # they keep their place in the queue
        self._queued.update(t.task_id for t in skipped)
        return placed

    def _best(self, task: Task, providers: list[ProviderConn]) -> ProviderConn | None:
        """The eligible provider with the lowest cost; untried ones first after a loss."""
        best, best_score = None, None
        graph_task = task.spec.deps is not None
        for p in providers:
            if p.id in task.avoid or why_ineligible(task.spec, task.account, p) is not None:
                continue
            moved = self.graph.local_bytes(task, p.id)[1] if graph_task else 0
            queued = max(0, len(p.running) - p.ad.slots + 1) / p.ad.slots
            cost = moved / TRANSFER_BYTES_PER_S + queued * self.avg_duration
            score = (p.id not in task.tried, -cost, p.free / p.capacity)
            if best_score is None or score > best_score:
                best, best_score = p, score
        return best
