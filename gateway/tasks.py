"""Task records and their lifecycle, spelled as one explicit transition table (as h11 does).

A task is ``pending`` until matched, ``running`` once assigned to a provider, and ends
``finished``, ``error`` or ``cancelled``. ``running -> pending`` is the retry after a provider is
lost; ``finished -> pending`` is the recomputation of a kept graph result whose only holder was
lost (lineage). Two states stand between a running task and its end when the client already has
its answer but the provider still holds the task:

- ``cancelling``: the client cancelled; the provider's final report is awaited, because it is
  billed (what ran until the kill is paid), and never forwarded;
- ``stopping``: the gateway stopped it (its budget was spent and settled for good, a vote was
  decided without it, the ledger failed it); later reports bill nothing.

Either ends in :attr:`Task.ending` (``cancelled`` or ``error``) when the provider reports, its
cancel grace runs out, or it leaves. Any other move raises :class:`TaskStateError`: a bug, never
silently absorbed.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.protocol import TaskSpec

log = logging.getLogger(__name__)


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    STOPPING = "stopping"
    FINISHED = "finished"
    ERROR = "error"
    CANCELLED = "cancelled"


TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.RUNNING, TaskState.ERROR, TaskState.CANCELLED}),
    TaskState.RUNNING: frozenset({TaskState.PENDING, TaskState.FINISHED, TaskState.ERROR,
                                  TaskState.CANCELLING, TaskState.STOPPING}),
    TaskState.CANCELLING: frozenset({TaskState.CANCELLED}),
    TaskState.STOPPING: frozenset({TaskState.ERROR, TaskState.CANCELLED}),
    TaskState.FINISHED: frozenset({TaskState.PENDING}),
    TaskState.ERROR: frozenset(),
    TaskState.CANCELLED: frozenset(),
}

TERMINAL = frozenset({TaskState.FINISHED, TaskState.ERROR, TaskState.CANCELLED})
#: The client has its answer: the terminal states, and the two that wait for the provider.
ANSWERED = TERMINAL | {TaskState.CANCELLING, TaskState.STOPPING}
#: Where each waiting state may end.
ENDINGS = {TaskState.CANCELLING: frozenset({TaskState.CANCELLED}),
           TaskState.STOPPING: frozenset({TaskState.ERROR, TaskState.CANCELLED})}


class TaskStateError(RuntimeError):
    """A transition the table does not allow."""


@dataclass(slots=True, eq=False)
class Task:
    """One task on the gateway. ``payload`` holds opaque buffers; nothing here unpickles them."""

    spec: TaskSpec
    account: str
    session: str
    func_blob: memoryview
    payload: list[memoryview]
    state: TaskState = TaskState.PENDING
    provider: str | None = None
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    #: When the current assignment was sent (monotonic): the start of the gateway's own clock for
    #: ``timeout`` and of the lease; None while pending.
    assigned_at: float | None = None
    #: The assignment's lease runs until then (monotonic); each heartbeat that mentions the task
    #: renews it. Past it, the gateway takes the task back.
    lease_until: float = 0.0
    #: Counts assignments, so a deadline set for an earlier one is recognised as stale.
    assignment: int = 0
    usage: dict[str, float] = field(default_factory=dict)
    #: For a ``cancelling`` or ``stopping`` task: the state it ends in (what the client was told).
    ending: TaskState | None = None
    #: Micro-tokens held in escrow for it (set by the hub's billing at submit); 0 holds none:
    #: such a task writes nothing to the ledger and runs only on free providers.
    escrow_micro: int = 0
    #: An earlier submission of this task (same session and key) was settled for good before a
    #: gateway restart lost its result: it runs again with no escrow, charged nothing, paid nothing.
    prepaid: bool = False
    #: How many times a finished graph task was recomputed after its result was lost.
    reruns: int = 0
    #: Replica number for ``redundancy > 1`` (0 is the first); siblings are the other replicas,
    #: and ``avoid`` the providers already running one (replicas need distinct providers).
    replica: int = 0
    nonce: str = field(default_factory=lambda: secrets.token_hex(6))
    siblings: list[Task] = field(default_factory=list)
    avoid: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def task_id(self) -> str:
        """Globally unique id: the session scopes the client's key."""
        base = f"{self.session}/{self.spec.key}"
        return f"{base}#{self.replica}" if self.replica else base

    @property
    def bill_id(self) -> str:
        """The escrow's id: unique per submission (a key may be reused once its task is done)
        and per recomputation, which is billed on its own."""
        base = f"{self.task_id}~{self.nonce}"
        return base if not self.reruns else f"{base}#rerun{self.reruns}"

    @property
    def payload_bytes(self) -> int:
        return sum(b.nbytes for b in self.payload)

    def move(self, new: TaskState) -> None:
        """Change state, checked against :data:`TRANSITIONS`."""
        if new not in TRANSITIONS[self.state]:
            raise TaskStateError(f"task {self.key}: {self.state.value} -> {new.value} not allowed")
        log.debug("task %s: %s -> %s", self.key, self.state.value, new.value)
        self.state = new

    def wait_for_provider(self, waiting: TaskState, ending: TaskState) -> None:
        """The client is answered (``ending``) while the provider still holds the task:
        ``cancelling`` (its final report is billed) or ``stopping`` (nothing more is billed)."""
        if ending not in ENDINGS[waiting]:
            raise TaskStateError(f"task {self.key}: {waiting.value} cannot end {ending.value}")
        self.move(waiting)
        self.ending = ending

    @property
    def billable(self) -> bool:
        """Whether a report of this task still moves money: running, or cancelled while running
        (its final bill)."""
        return self.state in (TaskState.RUNNING, TaskState.CANCELLING)
