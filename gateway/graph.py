"""Task graphs (Dask): who waits for what, where each kept result lives, what may be freed.

A graph task runs once its dependencies are available somewhere; its result stays on the
provider that made it (``who_has``). When a dependent is placed elsewhere, the result is
*delivered* there (fetched from a holder, relayed as opaque bytes). A result's *data* is freed
once the client released it and no pending task needs it; its *record* stays as long as a
dependent's record does, because that is the lineage: when a provider is lost, results held
nowhere else but still needed are recomputed, together with whatever inputs they need that are
gone too. The hub sends the messages; this module only keeps the books.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from gateway.tasks import Task, TaskState

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Node:
    """One graph task and its kept result."""

    task: Task
    deps: list[str]
    waiting: set[str] = field(default_factory=set)
    dependents: set[str] = field(default_factory=set)  # still to run: need the data
    users: set[str] = field(default_factory=set)  # dependents with a record: need the lineage
    who_has: set[str] = field(default_factory=set)
    nbytes: int = 0
    released: bool = False

    @property
    def available(self) -> bool:
        return self.task.state is TaskState.FINISHED and bool(self.who_has)


class Graph:
    """The graph tasks of all sessions, by task id."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        #: key -> providers that need its bytes delivered (a dependent runs there)
        self.deliveries: dict[str, set[str]] = defaultdict(set)
        #: key -> the provider a transfer is being fetched from
        self.fetching: dict[str, str] = {}
        #: key -> sessions that asked for the bytes (client fetch)
        self.client_fetches: dict[str, set[str]] = defaultdict(set)
        self.bytes_produced = 0
        self.bytes_moved = 0
        #: Records held per client account: what the per-account graph-size cap counts.
        self.per_account: Counter[str] = Counter()

    def add(self, task: Task) -> str | None:
        """Record a graph task; an error message if a dependency is unknown."""
        deps = [f"{task.session}/{d}" for d in task.spec.deps or ()]
        unknown = [d for d in deps if d not in self.nodes]
        if unknown:
            return (f"task {task.key} depends on {unknown[0].split('/', 1)[1]!r}, which this "
                    f"session does not have (never submitted, failed, or released)")
        node = Node(task, deps, waiting={d for d in deps if not self.nodes[d].available})
        for d in deps:
            self.nodes[d].dependents.add(task.task_id)
            self.nodes[d].users.add(task.task_id)
        self.nodes[task.task_id] = node
        self.per_account[task.account] += 1
        return None

    def ready(self, task_id: str) -> bool:
        node = self.nodes.get(task_id)
        return node is not None and not node.waiting

    def finished(self, task_id: str, provider_id: str, nbytes: int) -> list[Task]:
        """A kept result landed on ``provider_id``; returns dependents that became ready."""
        node = self.nodes[task_id]
        node.who_has.add(provider_id)
        node.nbytes = nbytes
        self.bytes_produced += nbytes
        ready = []
        for dep_id in node.dependents:
            dependent = self.nodes.get(dep_id)
            if dependent is not None and task_id in dependent.waiting:
                dependent.waiting.discard(task_id)
                if not dependent.waiting and dependent.task.state is TaskState.PENDING:
                    ready.append(dependent.task)
        return ready

    def done_with_deps(self, task_id: str) -> list[str]:
        """A task ended: it needs its deps no more. Returns deps that may now be freed."""
        node = self.nodes.get(task_id)
        if node is None:
            return []
        freeable = []
        for d in node.deps:
            dep = self.nodes.get(d)
            if dep is not None:
                dep.dependents.discard(task_id)
                if dep.released and not self._still_needed(dep):
                    freeable.append(d)
        return freeable

    def failed(self, task_id: str) -> list[Task]:
        """A graph task failed: every task downstream of it fails too (returned, removed)."""
        out, stack = [], [task_id]
        while stack:
            node = self.nodes.pop(stack.pop(), None)
            if node is None:
                continue
            self.per_account[node.task.account] -= 1
            for dep_id in node.dependents:
                dependent = self.nodes.get(dep_id)
                if dependent is not None:
                    out.append(dependent.task)
                    stack.append(dep_id)
        return out

    def release(self, task_id: str) -> bool:
        """The client let go of a key; True if it can be freed now."""
        node = self.nodes.get(task_id)
        if node is None:
            return False
        node.released = True
        return not self._still_needed(node)

    def free(self, task_id: str) -> set[str]:
        """Free a kept result's data; returns the providers that held it. The record goes too
        unless a dependent's record still needs it as lineage."""
        node = self.nodes.get(task_id)
        if node is None:
            return set()
        holders, node.who_has = node.who_has, set()
        self.deliveries.pop(task_id, None)
        self.fetching.pop(task_id, None)
        self._collect(task_id)
        return holders

    def _collect(self, task_id: str) -> None:
        """Drop records nobody needs: released, data gone, and no dependent record left."""
        stack = [task_id]
        while stack:
            node = self.nodes.get(stack.pop())
            if node is None or not node.released or node.users or node.who_has:
                continue
            del self.nodes[node.task.task_id]
            self.per_account[node.task.account] -= 1
            for d in node.deps:
                dep = self.nodes.get(d)
                if dep is not None:
                    dep.users.discard(node.task.task_id)
                    stack.append(d)

    def _still_needed(self, node: Node) -> bool:
        return any(self.nodes.get(d) is not None
                   and self.nodes[d].task.state not in (TaskState.FINISHED, TaskState.ERROR,
                                                        TaskState.CANCELLED)
                   for d in node.dependents)

    def missing_on(self, task: Task, provider_id: str) -> list[str]:
        """Dependencies of ``task`` that ``provider_id`` does not hold yet."""
        node = self.nodes[task.task_id]
        return [d for d in node.deps if provider_id not in self.nodes[d].who_has]

    def local_bytes(self, task: Task, provider_id: str) -> tuple[int, int]:
        """(bytes of ``task``'s inputs already on the provider, bytes it would need moved)."""
        node = self.nodes.get(task.task_id)
        if node is None:
            return 0, 0
        here = moved = 0
        for d in node.deps:
            dep = self.nodes[d]
            if provider_id in dep.who_has:
                here += dep.nbytes
            else:
                moved += dep.nbytes
        return here, moved

    def provider_lost(self, provider_id: str) -> list[Task]:
        """Forget what a lost provider held; return finished tasks that must run again."""
        lost = []
        for task_id, node in self.nodes.items():
            if provider_id not in node.who_has:
                continue
            node.who_has.discard(provider_id)
            if self.fetching.get(task_id) == provider_id:
                del self.fetching[task_id]
            needed = not node.released or self._still_needed(node)
            if not node.who_has and node.task.state is TaskState.FINISHED and needed:
                lost.append(task_id)
        rerun = self.rerun_closure(lost)
        if rerun:
            log.warning("provider %s lost kept results; recomputing %d tasks from lineage",
                        provider_id, len(rerun))
        return rerun

    def rerun_closure(self, task_ids: list[str]) -> list[Task]:
        """The finished tasks to run again for ``task_ids``' results to exist: them, and every
        input of theirs whose data is gone (freed or lost), recursively. Waiting sets are set
        for them and for their pending dependents."""
        rerun: dict[str, Node] = {}
        stack = list(task_ids)
        while stack:
            node = self.nodes.get(stack.pop())
            if node is None or node.task.task_id in rerun:
                continue
            if node.task.state is not TaskState.FINISHED or node.who_has:
                continue
            rerun[node.task.task_id] = node
            stack.extend(node.deps)
        for task_id, node in rerun.items():
            node.waiting = {d for d in node.deps if not self.nodes[d].available or d in rerun}
            for dep_id in node.dependents:
                dependent = self.nodes.get(dep_id)
                if dependent is not None and dependent.task.state is TaskState.PENDING:
                    dependent.waiting.add(task_id)
            for d in node.deps:  # its inputs are needed again, by it
                self.nodes[d].dependents.add(task_id)
        return [n.task for n in rerun.values()]
