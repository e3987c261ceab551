"""Graph bookkeeping and locality-aware placement, without a network."""

from __future__ import annotations

from gateway.graph import Graph
from gateway.protocol import ProviderAd, Runtime, TaskSpec
from gateway.registry import ProviderConn, Registry
from gateway.scheduler import Scheduler
from gateway.tasks import Task, TaskState

RT = Runtime("3.11", "3.1")


def task(key: str, deps: list[str] | None = None) -> Task:
    spec = TaskSpec(key=key, func="f", nb=0, runtime=RT, deps=deps, keep=deps is not None)
    return Task(spec, "acct", "s", memoryview(b""), [])


def provider(pid: str, slots: int = 1) -> ProviderConn:
    ad = ProviderAd(name=pid, cpus=slots, memory=2**30, runtime=RT, slots=slots)
    return ProviderConn(id=pid, account=f"acct-{pid}", ad=ad, send=lambda frame: None)


def finish(graph: Graph, t: Task, where: str, nbytes: int) -> list[Task]:
    t.move(TaskState.RUNNING)
    t.move(TaskState.FINISHED)
    return graph.finished(t.task_id, where, nbytes)


def test_a_task_waits_for_its_dependencies_then_becomes_ready() -> None:
    g = Graph()
    a, b = task("a", []), task("b", [])
    c = task("c", ["a", "b"])
    for t in (a, b, c):
        assert g.add(t) is None
    assert g.ready(a.task_id) and not g.ready(c.task_id)
    assert finish(g, a, "p1", 10) == []
    assert finish(g, b, "p2", 20) == [c]


def test_unknown_dependency_is_refused_with_its_name() -> None:
    g = Graph()
    assert "'nope'" in g.add(task("c", ["nope"]))


def test_placement_keeps_a_task_with_the_bytes_it_needs() -> None:
    reg, g = Registry(), Graph()
    p1, p2 = provider("p1"), provider("p2")
    reg.add(p1)
    reg.add(p2)
    a = task("a", [])
    g.add(a)
    finish(g, a, "p1", 8_000_000)
    s = Scheduler(reg, g)
    c = task("c", ["a"])
    g.add(c)
    s.enqueue(c)
    assert s.place() == [(p1, c)]
    assert g.missing_on(c, "p1") == [] and g.missing_on(c, "p2") == [a.task_id]


def test_a_busy_holder_is_waited_for_rather_than_moving_much_data() -> None:
    reg, g = Registry(), Graph()
    p1, p2 = provider("p1"), provider("p2")
    reg.add(p1)
    reg.add(p2)
    p1.running.update(f"x{i}" for i in range(p1.capacity))  # the holder is full
    a = task("a", [])
    g.add(a)
    finish(g, a, "p1", 500_000_000)
    s = Scheduler(reg, g)
    c = task("c", ["a"])
    g.add(c)
    s.enqueue(c)
    assert s.place() == [] and s.pending_tasks() == [c]


def plain(key: str, account: str, providers: list[str] | None = None) -> Task:
    spec = TaskSpec(key=key, func="f", nb=0, runtime=RT, providers=providers)
    return Task(spec, account, f"s-{account}", memoryview(b""), [])


def test_one_accounts_unplaceable_backlog_never_starves_another() -> None:
    reg, g = Registry(), Graph()
    busy, free = provider("busy"), provider("free")
    reg.add(busy)
    reg.add(free)
    busy.running.update(f"x{i}" for i in range(busy.capacity))
    s = Scheduler(reg, g)
    for i in range(10_000):  # pinned to a full provider: none can be placed now
        s.enqueue(plain(f"h{i}", "hostile", providers=["busy"]))
    mine = plain("mine", "victim")
    s.enqueue(mine)
    assert s.place() == [(free, mine)]
    assert len(s) == 10_000


def test_removal_from_a_queue_is_constant_time_and_keeps_the_order() -> None:
    reg, g = Registry(), Graph()
    s = Scheduler(reg, g)
    tasks = [plain(f"t{i}", "a") for i in range(50_000)]
    for t in tasks:
        s.enqueue(t)
    for t in tasks[:-3]:  # what deque.remove made quadratic
        s.discard(t)
    assert s.pending_tasks() == tasks[-3:] and len(s) == 3
    reg.add(provider("p", slots=8))
    assert [t for _, t in s.place()] == tasks[-3:]


def test_failure_fails_everything_downstream() -> None:
    g = Graph()
    a, b, c = task("a", []), task("b", ["a"]), task("c", ["b"])
    for t in (a, b, c):
        g.add(t)
    assert set(g.failed(a.task_id)) == {b, c}


def test_a_lost_only_copy_still_needed_is_recomputed() -> None:
    g = Graph()
    a, c = task("a", []), task("c", ["a"])
    g.add(a)
    g.add(c)
    finish(g, a, "p1", 10)
    assert g.provider_lost("p1") == [a]
    assert a.task_id in g.nodes[c.task_id].waiting


def test_released_and_unneeded_results_are_freed_from_their_holders() -> None:
    g = Graph()
    a, c = task("a", []), task("c", ["a"])
    g.add(a)
    g.add(c)
    finish(g, a, "p1", 10)
    assert not g.release(a.task_id)  # c still needs it
    finish(g, c, "p2", 1)
    assert g.done_with_deps(c.task_id) == [a.task_id]
    assert g.free(a.task_id) == {"p1"}


def test_replicas_never_share_a_provider() -> None:
    reg, g = Registry(), Graph()
    for pid in ("p1", "p2", "p3"):
        reg.add(provider(pid, slots=4))
    spec = TaskSpec(key="r", func="f", nb=0, runtime=RT, redundancy=3)
    reps = [Task(spec, "acct", "s", memoryview(b""), [], replica=i) for i in range(3)]
    for r in reps:
        r.siblings = [x for x in reps if x is not r]
    s = Scheduler(reg, g)
    for r in reps:
        s.enqueue(r)
    placed = s.place()
    assert len({p.id for p, _ in placed}) == 3
