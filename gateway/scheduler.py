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

Placement must not cost more with more providers online. Providers with room are kept in a heap by
how loaded they are (the same order the cost function ranks them in), re-ranked only when their
task set changes (the registry notes which), and rebuilt from scratch at most once a second (to
pick up standing that changed with no task moving: a bench that ran out). A plain task looks at the
top of the heap, its home and whoever it skipped, not at every provider; pinned tasks look at the
providers they pin; graph tasks (data locality) and a fleet where the top ``PROVIDER_SCAN`` do not
fit a task still score every provider.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable

from gateway import packages
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
    if spec.packages and (missing := packages.ad_unmet(spec.packages, ad)):
        return f"lacks {', '.join(missing)}"
    return None


def no_match_message(spec: TaskSpec, account: str, registry: Registry) -> str | None:
    """Why no provider online can ever run the task, or None if one can (or none is online)."""
    if not len(registry):
        return None
    candidates = registry.pinned(spec.providers) if spec.providers else registry
    if any(why_ineligible(spec, account, p) is None for p in candidates):
        return None  # the common case stops at the first provider that fits
    if spec.packages and (text := packages.no_match_message(spec.packages, candidates)):
        return f"task {spec.key}: {text}"
    reasons = {p.ad.name: why_ineligible(spec, account, p) for p in registry}
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
#: Providers a plain task takes off the top of the load heap before it gives up on the heap and
#: scores every provider (a fleet where most providers cannot run it).
PROVIDER_SCAN = 64
#: Seconds between rebuilds of the load heap from every provider online (standing may change
#: with no task moving: an allowance that grew, a bench that ran out).
REBUILD_SECONDS = 1.0

Entry = tuple[int, Task]
#: A provider in the load heap: its rank (``Scheduler._rank``) when pushed, and itself.
Ranked = tuple[tuple[float, float, int], int, ProviderConn]


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
        #: Bytes of a task's blobs a provider lacks (set by the hub's blob table): placement
        #: prefers where the data already is.
        self.missing_bytes: Callable[[Task, str], int] = lambda task, provider_id: 0
        self._pushes = itertools.count()  # ties between two entries of one provider
        self._heap: list[Ranked] = []  # providers with room, least loaded first (lazy: an
        # entry whose rank is no longer the provider's own is skipped when it comes up)
        self._rebuilt = float("-inf")
        #: account -> (its first queued task, its home, whether that home may run the task): the
        #: task waits at the head of its queue round after round, asked the same question.
        self._home_ok: dict[str, tuple[Task, ProviderConn, bool]] = {}
        self._short: dict[str, set[str]] = {}  # account -> ids left out of the heap for the
        # account's allowance: back in when any task of the account moves

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
        self._home_ok.pop(account, None)
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
        self._refresh(room)
        if not self._any_room(room):
            return []
        placed: list[tuple[ProviderConn, Task]] = []
        skipped: dict[str, list[Entry]] = {}
        active = list(self._turn)
        waiting: list[str] = []  # accounts whose home is full: they pass this round, in order
        stale = 0
        while active and self._any_room(room):
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
                self._refresh(room)
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
        (and is not home to more accounts per slot than its share: those move out). Asked of
        every queued account in every round: the cheap tests come first, eligibility and the
        money rule only for an account that would otherwise wait."""
        home = self.registry.get(self._home.get(task.account, ""))
        if (home is None or task.spec.deps is not None or room.fits(home, task)
                or not room.usable(home) or home.account in task.avoid):
            return False
        share = -(-len(self._turn) * home.ad.slots // max(1, room.total_slots))  # rounded up
        if self._homed[home.id] > share:
            return False
        passed = self._placements - self._home_since.get(task.account, self._placements)
        if passed >= HOME_PATIENCE * len(self._turn):
            return False
        cached = self._home_ok.get(task.account)
        if cached is not None and cached[0] is task and cached[1] is home:
            return cached[2]
        ok = why_ineligible(task.spec, task.account, home) is None and self.admits(task, home)
        self._home_ok[task.account] = (task, home, ok)  # asked again each round it waits
        return ok

    # ------------------------------------------------------------------ the load heap

    def _rank(self, p: ProviderConn) -> tuple[float, float, int]:
        """Where a provider stands for a plain task, best first: expected wait for a slot, then
        the share of its capacity still free, then join order (the cost function's order)."""
        queued = max(0, len(p.running) - p.ad.slots + 1) / p.ad.slots
        return (queued, -p.free / p.capacity, self.registry.order.get(p.id, 0))

    def _push(self, p: ProviderConn) -> None:
        if p.free > 0:
            heapq.heappush(self._heap, (self._rank(p), next(self._pushes), p))

    def _refresh(self, room: Room) -> None:
        """Re-rank the providers whose task set changed; rebuild the whole heap now and then
        (and when stale entries pile up) from every provider online."""
        now = time.monotonic()
        if now - self._rebuilt >= REBUILD_SECONDS or len(self._heap) > 4 * len(self.registry) + 64:
            self._rebuilt = now
            self.registry.take_changed()
            self._short.clear()
            self._heap = [(self._rank(p), next(self._pushes), p) for p in self.registry
                          if p.free > 0]
            heapq.heapify(self._heap)
            return
        for p in self.registry.take_changed():
            self._push(p)
            for sid in self._short.pop(p.account, ()):  # the account's allowance moved
                if (sibling := self.registry.get(sid)) is not None and sibling is not p:
                    self._push(sibling)

    def _current(self, ranked: Ranked) -> bool:
        rank, _, p = ranked
        return self.registry.get(p.id) is p and rank == self._rank(p)

    def _has_room(self, p: ProviderConn, room: Room) -> bool:
        """Whether ``p`` may take any task now; if not it leaves the heap (it comes back when its
        account's tasks move, or at the next rebuild)."""
        if p.free > 0 and room.usable(p) and room.account_room(p) > 0:
            return True
        if p.free > 0 and room.usable(p):
            self._short.setdefault(p.account, set()).add(p.id)
        return False

    def _any_room(self, room: Room) -> bool:
        """Whether some provider online has room (the heap's top, once cleaned)."""
        while self._heap:
            top = self._heap[0]
            if self._current(top) and self._has_room(top[2], room):
                return True
            heapq.heappop(self._heap)
        return False

    # ------------------------------------------------------------------ choosing a provider

    def _best(self, task: Task, room: Room) -> ProviderConn | None:
        """The eligible provider with the lowest cost that has room for the task now; untried
        accounts first after a loss. A graph task waits for its best provider when that one is
        full (data locality), so it may get None although another provider has room."""
        if task.spec.deps is not None or (task.spec.refs and not task.spec.providers):
            return self._best_of(task, room, room.providers())
        if task.spec.providers:
            return self._best_of(task, room, self.registry.pinned(task.spec.providers))
        candidates = self._from_heap(task, room)
        if candidates is None:  # the top of the heap could not run it: look at everyone
            return self._best_of(task, room, room.providers())
        home = self.registry.get(self._home.get(task.account, ""))
        if home is None or home in candidates:  # the heap's pick, already checked, wins
            return candidates[0] if candidates else None
        candidates.append(home)
        candidates.sort(key=lambda p: self.registry.order.get(p.id, 0))
        return self._best_of(task, room, candidates)

    def _from_heap(self, task: Task, room: Room) -> list[ProviderConn] | None:
        """The best provider for a plain task by load (and the best of an account it already
        tried, in case no other fits), from the top of the heap; None past ``PROVIDER_SCAN``
        providers that could not run it."""
        seen: list[Ranked] = []
        found: list[ProviderConn] = []
        tried: ProviderConn | None = None
        ids: set[str] = set()
        try:
            while self._heap:
                if len(seen) >= PROVIDER_SCAN:
                    return None
                ranked = heapq.heappop(self._heap)
                p = ranked[2]
                if p.id in ids or not self._current(ranked) or not self._has_room(p, room):
                    continue  # a duplicate, stale, or no room: dropped
                ids.add(p.id)
                seen.append(ranked)
                if not self._may_run(task, p, room):
                    continue
                if p.account not in task.tried:
                    found.append(p)
                    break
                if tried is None:
                    tried = p
            return found + ([tried] if tried is not None else [])
        finally:
            for ranked in seen:
                heapq.heappush(self._heap, ranked)

    def _may_run(self, task: Task, p: ProviderConn, room: Room) -> bool:
        """Whether a plain task may go to ``p`` now (eligible, paid for, room)."""
        return (p.account not in task.avoid and room.usable(p) and room.fits(p, task)
                and why_ineligible(task.spec, task.account, p) is None and self.admits(task, p))

    def _best_of(self, task: Task, room: Room, providers: list[ProviderConn]
                 ) -> ProviderConn | None:
        """The cost function over ``providers`` (in join order): the lowest cost wins."""
        best, best_score = None, None
        graph_task = task.spec.deps is not None
        for p in providers:
            if p.account in task.avoid or why_ineligible(task.spec, task.account, p) is not None:
                continue
            if not self.admits(task, p):
                continue
            if not room.usable(p):
                continue  # benched: as if offline
            if not graph_task and not room.fits(p, task):
                continue
            moved = self.graph.local_bytes(task, p.id)[1] if graph_task else 0
            if task.spec.refs:
                moved += self.missing_bytes(task, p.id)
            queued = max(0, len(p.running) - p.ad.slots + 1) / p.ad.slots
            cost = moved / TRANSFER_BYTES_PER_S + queued * self.avg_duration
            # A plain task takes an idle slot first, then its home (a warm worker), then the
            # shortest wait.
            home = not graph_task and self._home.get(task.account) == p.id
            idle = not graph_task and queued == 0
            score = ((p.account not in task.tried, idle, home, -cost, p.free / p.capacity)
                     if not task.spec.refs else  # the data's holder first: moving it costs most
                     (p.account not in task.tried, -cost, idle, p.free / p.capacity))
            if best_score is None or score > best_score:
                best, best_score = p, score
        if best is not None and graph_task and not room.fits(best, task):
            return None
        return best


class Room:
    """What each provider account may still take in one placement round. Built in O(1): a
    provider's own room is read from its task set (placement adds to it as it goes), an
    account's allowance is looked up the first time the round meets the account."""

    def __init__(self, registry: Registry, standing: Standing) -> None:
        self.registry = registry
        self.standing = standing
        self._benched: dict[str, bool] = {}
        self._account_free: dict[str, int] = {}
        self._providers: list[ProviderConn] | None = None

    @property
    def total_slots(self) -> int:
        return self.registry.total_slots

    def providers(self) -> list[ProviderConn]:
        """Every provider online, in join order (for the passes that score them all)."""
        if self._providers is None:
            self._providers = list(self.registry)
        return self._providers

    def usable(self, p: ProviderConn) -> bool:
        benched = self._benched.get(p.account)
        if benched is None:
            benched = self._benched[p.account] = self.standing.benched(p.account)
        return not benched

    def account_room(self, p: ProviderConn) -> int:
        free = self._account_free.get(p.account)
        if free is None:
            held = sum(len(c.running) for c in self.registry.of_account(p.account))
            free = self._account_free[p.account] = self.standing.allowance(p.account) - held
        return free

    def fits(self, p: ProviderConn, task: Task) -> bool:
        if p.free <= 0 or self.account_room(p) <= 0:
            return False
        return task.spec.timeout is None or p.ad.slots - len(p.running) > 0

    def take(self, p: ProviderConn, task: Task) -> None:
        """``p`` takes ``task`` (its task set grows by it right after): the account's room
        shrinks."""
        self._account_free[p.account] = self.account_room(p) - 1
