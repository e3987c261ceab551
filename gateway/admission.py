"""Admission: whether each task of a submit frame is taken, checked before anything is held.

The per-account caps (open tasks, queued argument bytes, graph tasks) count the tasks of the same
frame accepted so far, so one large frame cannot get past them; keys, derived ids, functions,
redundancy and whether any provider online could ever run the task are checked here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway import protocol as p
from gateway.graph import Graph
from gateway.limits import Limits
from gateway.outcomes import failure
from gateway.registry import Registry
from gateway.scheduler import no_match_message, why_ineligible
from gateway.spot_check import spot_check_problem
from gateway.task_table import TaskTable


@dataclass(slots=True)
class Batch:
    """What one submit frame has added so far, for the per-account caps."""

    tasks: int = 0
    nbytes: int = 0
    graph: int = 0
    #: Placement constraints some online provider meets: the rest of a 10,000-task batch that
    #: shares them needs no scan of the providers.
    fits: set = field(default_factory=set)

    def add(self, spec: p.TaskSpec, payload: Sequence[memoryview]) -> None:
        self.tasks += spec.redundancy
        self.nbytes += spec.redundancy * sum(b.nbytes for b in payload)
        self.graph += spec.deps is not None


class Admission:
    """The submit-time checks of one gateway (reads the task table, graph and registry)."""

    def __init__(self, tasks: TaskTable, graph: Graph, registry: Registry,
                 limits: Limits) -> None:
        self.tasks = tasks
        self.graph = graph
        self.registry = registry
        self.limits = limits

    def refusal(self, spec: p.TaskSpec, account: str, task_id: str,
                funcs: dict[str, memoryview], batch: Batch) -> p.Result | None:
        """Why one task of a batch is refused, or None. Caps count the tasks of this batch
        accepted so far, so one large frame cannot get past them."""
        if spec.func not in funcs:
            return failure(spec.key, p.ErrorCode.SCHEMA,
                           f"task {spec.key} names function {spec.func} that the batch lacks")
        derived = f"{task_id}#{spec.redundancy - 1}" if spec.redundancy > 1 else task_id
        if len(derived) > p.MAX_KEY_LEN:
            fits = p.MAX_KEY_LEN - (len(derived) - len(spec.key))
            return failure(spec.key, p.ErrorCode.SCHEMA,
                           f"task key of {len(spec.key)} characters is too long: the gateway "
                           f"prefixes it with the session id (and a replica number), and the "
                           f"result is over the protocol's {p.MAX_KEY_LEN}; use keys of at most "
                           f"{fits} characters")
        if task_id in self.tasks or task_id in self.graph.nodes:
            return failure(spec.key, p.ErrorCode.SCHEMA, f"task key {spec.key!r} already in use")
        if self.tasks.open_count(account) + batch.tasks >= self.limits.open_tasks:
            return failure(spec.key, p.ErrorCode.LIMIT,
                           f"this account already has {self.limits.open_tasks} open tasks, the "
                           f"gateway's cap; wait for some to finish, then submit again")
        if self.tasks.queued_bytes(account) + batch.nbytes >= self.limits.queued_bytes:
            return failure(spec.key, p.ErrorCode.LIMIT,
                           f"this account already has {self.limits.queued_bytes} bytes of "
                           f"arguments waiting on the gateway, its cap; wait, then submit again")
        if spec.deps is not None and (self.graph.per_account[account] + batch.graph
                                      >= self.limits.graph_tasks):
            return failure(spec.key, p.ErrorCode.LIMIT,
                           f"this account already has {self.limits.graph_tasks} graph tasks on "
                           f"the gateway, its cap; release results you no longer need (or let "
                           f"running graphs finish), then submit again")
        needs = (tuple(spec.providers or ()), spec.runtime, tuple(sorted(spec.resources.items())),
                 spec.max_price, tuple(spec.packages))
        if needs not in batch.fits:
            why = no_match_message(spec, account, self.registry)
            if why is not None:
                return failure(spec.key, p.ErrorCode.NO_MATCH, why)
            batch.fits.add(needs)
        if spec.spot_check > 0 or spec.check is not None:
            why = spot_check_problem(spec, funcs)
            if why is not None:
                return failure(spec.key, p.ErrorCode.SCHEMA, why)
        if spec.redundancy > 1:
            if spec.deps is not None:
                return failure(spec.key, p.ErrorCode.SCHEMA,
                               "redundancy > 1 is for plain tasks, not graph tasks")
            fit = len({c.account for c in self.registry
                       if why_ineligible(spec, account, c) is None})
            if fit < spec.redundancy:
                return failure(spec.key, p.ErrorCode.NO_MATCH,
                               f"redundancy={spec.redundancy} needs that many providers of "
                               f"distinct accounts; {fit} online can run this task",
                               "NoMatchingProvider")
        return None
