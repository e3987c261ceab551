"""Placement at many providers: the load heap picks what scoring every provider picks, and a
placement asks the money rule about a few providers, not about every one online."""

from __future__ import annotations

import random

from gateway.graph import Graph
from gateway.protocol import ProviderAd, Runtime, TaskSpec
from gateway.registry import ProviderConn, Registry
from gateway.scheduler import Room, Scheduler
from gateway.standing import Standing
from gateway.tasks import Task

RT = Runtime("3.11", "3.1")


def fleet(n: int, rng: random.Random, standing: Standing) -> tuple[Registry, list[ProviderConn]]:
    """``n`` providers of mixed slots and prices; some accounts hold several connections and a
    small allowance (so account-wide room runs out before a provider's own)."""
    registry, conns = Registry(), []
    for i in range(n):
        account = f"acct{i % (n // 3 + 1)}"
        ad = ProviderAd(name=f"p{i}", cpus=4, memory=2**30, runtime=RT,
                        slots=rng.choice((1, 1, 2, 4)),
                        prices=rng.choice(({}, {"cpu": 0.001}, {"cpu": 5.0})))
        conn = ProviderConn(id=f"p{i}", account=account, ad=ad, send=lambda frame: None)
        registry.add(conn)
        conns.append(conn)
        standing.of(account).allowance = rng.choice((3, 10, 1000))
    return registry, conns


def task(key: str, account: str, **spec: object) -> Task:
    return Task(TaskSpec(key=key, func="f", nb=0, runtime=RT, **spec), account, "s",  # type: ignore[arg-type]
                memoryview(b""), [])


def test_the_heap_picks_what_scoring_every_provider_picks() -> None:
    rng = random.Random(11)
    standing = Standing()
    registry, conns = fleet(300, rng, standing)
    scheduler = Scheduler(registry, Graph(), standing)
    # the money rule: the 5-token provider is too dear for escrows under 5 tokens
    escrow = {f"a{i}": rng.choice((1, 10)) for i in range(12)}
    scheduler.admits = lambda t, p: p.ad.prices.get("cpu", 0) <= escrow[t.account]
    held: list[tuple[ProviderConn, Task]] = []
    compared = 0
    for step in range(3000):
        room = Room(registry, standing)
        scheduler._refresh(room)
        account = f"a{rng.randrange(12)}"
        t = task(f"t{step}", account, timeout=rng.choice((None, None, 5.0)))
        if rng.random() < 0.2:  # lost once on some provider's account
            t.tried.add(rng.choice(conns).account)
        if rng.random() < 0.3:
            scheduler._home[account] = rng.choice(conns).id
        expected = scheduler._best_of(t, room, room.providers())
        got = scheduler._best(t, room)
        assert got is expected, (step, got and got.id, expected and expected.id)
        compared += expected is not None
        if got is not None and rng.random() < 0.7:
            room.take(got, t)
            got.running.add(t.task_id)
            held.append((got, t))
        if held and rng.random() < 0.45:  # a result comes back
            conn, done = held.pop(rng.randrange(len(held)))
            conn.running.discard(done.task_id)
    assert compared > 1000  # most steps found room: the comparison was not vacuous


def test_a_placement_asks_the_money_rule_about_a_few_providers_not_all() -> None:
    standing = Standing()
    registry = Registry()
    for i in range(1000):
        registry.add(ProviderConn(id=f"p{i}", account=f"acct{i}", send=lambda frame: None,
                                  ad=ProviderAd(name=f"p{i}", cpus=1, memory=2**30, runtime=RT,
                                                prices={"cpu": 0.001})))
    scheduler = Scheduler(registry, Graph(), standing)
    asked = 0

    def admits(t: Task, p: ProviderConn) -> bool:
        nonlocal asked
        asked += 1
        return True

    scheduler.admits = admits
    for i in range(2000):
        scheduler.enqueue(task(f"t{i}", f"a{i % 100}"))
    placed = scheduler.place()
    assert len(placed) == 2000
    assert asked <= 3 * len(placed), asked  # scoring everyone: 1,000 per task


def test_pinned_tasks_reach_their_provider_among_many() -> None:
    standing = Standing()
    registry = Registry()
    for i in range(500):
        registry.add(ProviderConn(id=f"p{i}", account=f"acct{i}", send=lambda frame: None,
                                  ad=ProviderAd(name=f"p{i}", cpus=1, memory=2**30, runtime=RT)))
    scheduler = Scheduler(registry, Graph(), standing)
    scheduler.enqueue(task("by-id", "a", providers=["p417"]))
    scheduler.enqueue(task("by-name", "a", providers=["p3"]))
    scheduler.enqueue(task("by-account", "a", providers=["acct250"]))
    assert sorted((c.id, t.key) for c, t in scheduler.place()) == [
        ("p250", "by-account"), ("p3", "by-name"), ("p417", "by-id")]
