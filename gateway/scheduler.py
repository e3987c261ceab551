"""Matching tasks to providers: who *may* run a task, and who *should* run it now.

Eligibility is a pure function of the task and the provider's advertisement; placement picks the
eligible provider with the most free room. Pending tasks wait in one queue per client account and
placement takes them round-robin across accounts, so one account's backlog (however large, and
however much of it no provider can take now) never starves another's. Removing a task from a queue
is O(1): its entry is forgotten and dropped when the queue reaches it. A task no online provider
could ever take is reported at once rather than left waiting.

An account's tasks stay on its *home* provider when they can: a provider reuses a warm worker
only for the same account, and starting a sandboxed one costs far more than a trivial task. So when
an account's turn comes and its home is full, it lets the next account in turn take the room and
keeps its own place; it goes elsewhere when nobody else wants the room, or once it has let
``HOME_PATIENCE`` times as many tasks be placed since its last one as there are queued accounts (in
a fair round-robin about that many pass between two of its own). Homes are kept balanced (queued
accounts per slot): an account moves home only where that evens the groups out, so each provider
takes turns among about as many accounts as any other and every account keeps its fair share.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable

from gateway.graph import Graph
from gateway.protocol import TaskSpec
from gateway.registry import ProviderConn, Registry
from gateway.standing import Standing
from gateway.tasks import Task, TaskState


def why_ineligible(spec: TaskSpec, account: str, provider: ProviderConn) -> str | None:
    """None if ``provider`` may run the task, else a short reason (for error messages)."""
    ad = provider.ad
    if spec.providers and not provider.answers_to(spec.providers):
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
#: Queued tasks of one account examined per placement round that find no provider with room:
#: bounds the cost of one round on a long queue (the rest are looked at in later rounds).
SCAN_LIMIT = 256
#: Forgotten (cancelled, failed) entries dropped per placement round, at most.
STALE_LIMIT = 50_000
#: How long an account waits for its full home provider: placements since its own last one, per
#: queued account (1 is a fair round-robin's gap; past it, the account is behind its share).
HOME_PATIENCE = 4.0
#: Homes remembered (accounts with nothing queued included) before those without a queue go.
HOMES_KEPT = 100_000

Entry = tuple[int, Task]


class Scheduler:
    """Pending tasks and their placement onto providers, weighing data locality against waiting.

    As distributed's ``worker_objective``: a provider's cost for a task is the time to move the
    task's inputs it lacks plus the expected wait for a free slot; the cheapest eligible provider
    wins. If that provider is full, a graph task waits for it rather than moving data elsewhere.

    What a provider may hold is the least of its advertised capacity and its account's allowance
    (:mod:`gateway.standing`); a benched account gets nothing. A task with a ``timeout`` goes only
    to a free slot (never into a provider's prefetch queue), because the gateway's clock for it
    starts at the assignment.
    """

    def __init__(self, registry: Registry, graph: Graph, standing: Standing | None = None) -> None:
        self.registry = registry
        self.graph = graph
        self.standing = standing or Standing()
        self.queues: dict[str, deque[Entry]] = {}  # by client account
        self._turn: dict[str, None] = {}  # accounts with a queue, served longest ago first
        self._tokens: dict[str, int] = {}  # task id -> its live entry (a task is queued once)
        self._live: Counter[str] = Counter()  # live entries by account
        self._seq = itertools.count()
        self._home: dict[str, str] = {}  # account -> its home provider's id (kept a while
        # after its queue empties: a notebook's next cell finds its warm worker)
        self._homed: Counter[str] = Counter()  # provider id -> queued accounts homed there
        self._home_since: dict[str, int] = {}  # account -> self._placements at its last one
        self._placements = 0
        #: Moving average of task run time, the unit of expected waiting.
        self.avg_duration = 0.05
        #: The money rule, set by the hub's billing: may this task be placed on that provider
        #: (a priced provider only takes a task whose escrow covers a billing interval there)?
        self.admits: Callable[[Task, ProviderConn], bool] = lambda task, provider: True

    def __len__(self) -> int:
        return len(self._tokens)

    def queued(self, task: Task) -> bool:
        return task.task_id in self._tokens

    def pending_tasks(self) -> list[Task]:
        """Every queued task (a snapshot), account by account."""
        return [t for q in self.queues.values() for tok, t in q
                if self._tokens.get(t.task_id) == tok]

    def enqueue(self, task: Task, front: bool = False) -> None:
        if task.task_id in self._tokens:
            return
        token = next(self._seq)
        self._tokens[task.task_id] = token
        self._live[task.account] += 1
        queue = self.queues.get(task.account)
        if queue is None:
            queue = self.queues[task.account] = deque()
            self._turn[task.account] = None
            if (home := self._home.get(task.account)) is not None:
                self._homed[home] += 1
        (queue.appendleft if front else queue.append)((token, task))

    def discard(self, task: Task) -> None:
        """Forget a queued task in O(1); its entry is dropped when its queue reaches it."""
        if self._tokens.pop(task.task_id, None) is not None:
            self._live[task.account] -= 1
            self._compact(task.account)

    def _compact(self, account: str) -> None:
        """Rebuild a queue that is mostly forgotten entries (bounds memory, amortised O(1))."""
        queue = self.queues.get(account)
        if queue is None or len(queue) < 1024 or len(queue) < 4 * self._live[account]:
            return
        kept = deque(e for e in queue if self._tokens.get(e[1].task_id) == e[0])
        if kept:
            self.queues[account] = kept
        else:
            self._drop_queue(account)

    def _drop_queue(self, account: str) -> None:
        del self.queues[account]
        del self._live[account]
        if (home := self._home.get(account)) is not None:
            self._homed[home] -= 1
        self._home_since.pop(account, None)
        del self._turn[account]
        if len(self._home) > HOMES_KEPT:  # forget the homes of accounts with nothing queued
            self._home = {a: home for a, home in self._home.items() if a in self._turn}

    def observe(self, seconds: float) -> None:
        self.avg_duration = 0.9 * self.avg_duration + 0.1 * max(seconds, 1e-4)

    # ------------------------------------------------------------------ placement

    def place(self) -> list[tuple[ProviderConn, Task]]:
        """Assign pending tasks to providers with room, one account at a time in turn (each in
        its queue order); the rest keep waiting, in place."""
        if not self._tokens:
            return []
        room = Room(self.registry, self.standing)
        if not room.any():
            return []
        placed: list[tuple[ProviderConn, Task]] = []
        skipped: dict[str, list[Entry]] = {}
        active = list(self._turn)
        waiting: list[str] = []  # accounts whose home is full: they pass this round, in order
        stale = 0
        while active and room.any():
            for account in list(active):
                entry = self._next(account)
                if entry is None:
                    active.remove(account)
                    continue
                task = entry[1]
                if task.state is not TaskState.PENDING or (
                        task.spec.deps is not None and not self.graph.ready(task.task_id)):
                    self._forget(entry)  # ended meanwhile, or waits for inputs (requeued later)
                    stale += 1
                    if stale > STALE_LIMIT:
                        active.clear()
                        break
                    continue
                if waiting is not active and self._waits_for_home(task, room):
                    self.queues[account].appendleft(entry)  # keeps its place
                    active.remove(account)
                    waiting.append(account)
                    continue
                best = self._best(task, room)
                if best is None:
                    held = skipped.setdefault(account, [])
                    held.append(entry)
                    if len(held) >= SCAN_LIMIT:
                        active.remove(account)
                    continue
                self._forget(entry)
                room.take(best, task)
                best.running.add(task.task_id)
                placed.append((best, task))
                self._move_home(account, best)
                del self._turn[account]  # served: the others go first (it is queued, so in it)
                self._turn[account] = None
                self._placements += 1
                self._home_since[account] = self._placements
                for sibling in task.siblings:  # replicas must land on distinct accounts
                    sibling.avoid.add(best.account)
            if not active and waiting is not active and stale <= STALE_LIMIT:  # nobody else
                active = waiting  # wants the room: the accounts that passed take it in turn
        for account, held in skipped.items():  # they keep their place in the queue
            self.queues[account].extendleft(reversed(held))
        return placed

    def _next(self, account: str) -> Entry | None:
        """The first live entry of an account's queue (forgotten ones are dropped on the way)."""
        queue = self.queues.get(account)
        while queue:
            token, task = queue.popleft()
            if self._tokens.get(task.task_id) == token:
                return token, task
        if queue is not None and not self._live[account]:
            self._drop_queue(account)
        return None

    def _forget(self, entry: Entry) -> None:
        task = entry[1]
        if self._tokens.get(task.task_id) == entry[0]:
            del self._tokens[task.task_id]
            self._live[task.account] -= 1

    def _move_home(self, account: str, to: ProviderConn) -> None:
        """Make ``to`` the account's home if it has none, its home left, or it evens the groups."""
        old = self._home.get(account)
        if old == to.id:
            return
        if old is not None:
            home = self.registry.get(old)
            if home is not None and (self._homed[to.id] + 1) / to.ad.slots >= \
                    self._homed[old] / home.ad.slots:
                return
            self._homed[old] -= 1
            if not self._homed[old]:
                del self._homed[old]
        self._home[account] = to.id
        self._homed[to.id] += 1

    def _waits_for_home(self, task: Task, room: Room) -> bool:
        """Whether the task passes its turn: its account's home could run it but is full now
        (and is not home to more accounts per slot than its share: those move out)."""
        home = self.registry.get(self._home.get(task.account, ""))
        if (home is None or task.spec.deps is not None or home.id not in room.free
                or room.fits(home, task) or not room.usable(home) or home.account in task.avoid
                or why_ineligible(task.spec, task.account, home) is not None
                or not self.admits(task, home)):
            return False
        share = -(-len(self._turn) * home.ad.slots // max(1, room.total_slots))  # rounded up
        if self._homed[home.id] > share:
            return False
        passed = self._placements - self._home_since.get(task.account, self._placements)
        return passed < HOME_PATIENCE * len(self._turn)

    def _best(self, task: Task, room: Room) -> ProviderConn | None:
        """The eligible provider with the lowest cost that has room for the task now; untried
        accounts first after a loss. A graph task waits for its best provider when that one is
        full (data locality), so it may get None although another provider has room."""
        best, best_score = None, None
        graph_task = task.spec.deps is not None
        for p in room.providers:
            if p.account in task.avoid or why_ineligible(task.spec, task.account, p) is not None:
                continue
            if not self.admits(task, p):
                continue
            if not room.usable(p):
                continue  # benched: as if offline
            if not graph_task and not room.fits(p, task):
                continue
            moved = self.graph.local_bytes(task, p.id)[1] if graph_task else 0
            queued = max(0, len(p.running) - p.ad.slots + 1) / p.ad.slots
            cost = moved / TRANSFER_BYTES_PER_S + queued * self.avg_duration
            # A plain task takes an idle slot first, then its home (a warm worker), then the
            # shortest wait.
            home = not graph_task and self._home.get(task.account) == p.id
            idle = not graph_task and queued == 0
            score = (p.account not in task.tried, idle, home, -cost, p.free / p.capacity)
            if best_score is None or score > best_score:
                best, best_score = p, score
        if best is not None and graph_task and not room.fits(best, task):
            return None
        return best


class Room:
    """What each provider (and each provider account) may still take in one placement round."""

    def __init__(self, registry: Registry, standing: Standing) -> None:
        self.providers = list(registry)
        self.standing = standing
        self.free = {p.id: p.free for p in self.providers}
        self.slots = {p.id: p.ad.slots - len(p.running) for p in self.providers}
        self.total_slots = sum(p.ad.slots for p in self.providers)
        self.benched = {p.account for p in self.providers if standing.benched(p.account)}
        self.account_free: dict[str, int] = {}
        for p in self.providers:
            if p.account not in self.account_free:
                held = sum(len(c.running) for c in registry.of_account(p.account))
                self.account_free[p.account] = standing.allowance(p.account) - held

    def usable(self, p: ProviderConn) -> bool:
        return p.account not in self.benched

    def fits(self, p: ProviderConn, task: Task) -> bool:
        if self.free[p.id] <= 0 or self.account_free[p.account] <= 0:
            return False
        return task.spec.timeout is None or self.slots[p.id] > 0

    def any(self) -> bool:
        return any(self.free[p.id] > 0 and self.account_free[p.account] > 0
                   and p.account not in self.benched for p in self.providers)

    def take(self, p: ProviderConn, task: Task) -> None:
        self.free[p.id] -= 1
        self.slots[p.id] -= 1
        self.account_free[p.account] -= 1
