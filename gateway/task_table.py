"""The task table: every open task on the gateway, and what each account and session has open.

One owner for the records the caps are counted on (open tasks and queued argument bytes per
account) and for which tasks belong to which client session, so the counts can never drift from
the table: a task is admitted and forgotten here, nowhere else.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

from gateway.tasks import Task


class TaskTable:
    """Open tasks by task id (replicas and graph tasks included)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._open: Counter[str] = Counter()  # by account
        self._bytes: Counter[str] = Counter()  # by account: argument bytes held here
        self._by_session: defaultdict[str, set[str]] = defaultdict(set)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __getitem__(self, task_id: str) -> Task:
        return self._tasks[task_id]

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    def values(self) -> list[Task]:
        return list(self._tasks.values())

    def admit(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._open[task.account] += 1
        self._bytes[task.account] += task.payload_bytes
        self._by_session[task.session].add(task.task_id)

    def forget(self, task: Task) -> bool:
        """Drop a task that ended; False if it was not here (forgotten already)."""
        if self._tasks.pop(task.task_id, None) is None:
            return False
        self._open[task.account] -= 1
        self._bytes[task.account] -= task.payload_bytes
        ids = self._by_session.get(task.session)
        if ids is not None:
            ids.discard(task.task_id)
            if not ids:
                del self._by_session[task.session]
        return True

    def open_count(self, account: str) -> int:
        return self._open[account]

    def queued_bytes(self, account: str) -> int:
        return self._bytes[account]

    def keys_of_session(self, session_id: str) -> list[str]:
        """The client keys of a session's open tasks (replicas once, by their first)."""
        return sorted({self._tasks[t].key for t in self._by_session.get(session_id, ())})
