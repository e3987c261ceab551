"""The hub's money rules, driven as the websocket shell drives it: decoded messages in, frames out.

The hub is sans-I/O (:mod:`gateway.hub`), so these tests run the real hub on a real SQLite ledger
and read the frames it sends each peer; no component of ours is replaced. They cover what a
well-behaved client never makes the gateway do (its own checks refuse first), and a gateway
restart on the same ledger, which needs no process to kill:

- a replica that cannot be funded refuses the whole task with one error result;
- a provider that vanishes mid-task: the failure's cost is what the client's balance lost;
- a task resubmitted after a restart, whose earlier submission was settled for good, is charged
  nothing again (and its provider is not paid: documented);
- the balance query answers what is available and what is held.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from core_driver import Books, Peer

from gateway import protocol as p
from gateway.billing import Billing
from gateway.hub import Hub
from gateway.identity import Identity
from gateway.ledger import MICRO, Ledger, to_micro
from gateway.registry import ProviderConn
from gateway.sessions import ClientSession
from provider.provider import local_runtime

FAUCET = 10 * MICRO
CLIENT = "c" * 64
PROVIDER = "d" * 64


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


BOOKS: weakref.WeakKeyDictionary[Hub, Books] = weakref.WeakKeyDictionary()


def gateway(db: Path, identity: Identity | None = None) -> tuple[Hub, Ledger]:
    ledger = Ledger(db, faucet_micro=FAUCET)
    hub = Hub(Billing(ledger, identity or Identity.generate()))
    BOOKS[hub] = Books(hub)
    return hub, ledger


def commit(hub: Hub) -> None:
    """The shell's turn ends: the accounting worker commits what the hub decided."""
    BOOKS[hub].commit()


def stop(hub: Hub, ledger: Ledger) -> None:
    BOOKS.pop(hub).close()
    ledger.close()


@pytest.fixture
def hub(db: Path) -> Iterator[Hub]:
    h, ledger = gateway(db)
    yield h
    commit(h)
    ledger.check(live=h.live_escrows())
    stop(h, ledger)


def provider(hub: Hub, name: str = "paid", price: float = 1.0, account: str = PROVIDER,
             cpus: int = 4) -> tuple[ProviderConn, Peer]:
    peer = Peer()
    ad = p.ProviderAd(name=name, cpus=cpus, memory=2**30, runtime=local_runtime(),
                      prices={"cpu": price}, slots=cpus)
    conn = ProviderConn(id=f"{name}-{account[:8]}", account=account, ad=ad, send=peer.send)
    BOOKS[hub].load(account)
    hub.join_provider(conn)
    return conn, peer


def client(hub: Hub, session: str = "s1") -> tuple[ClientSession, Peer]:
    peer = Peer()
    BOOKS[hub].load(CLIENT)
    prepaid = hub.billing.ledger.settled_under(f"{session}/")  # as the shell reads it
    return hub.attach_client(CLIENT, session, peer.send, prepaid), peer


def submit(hub: Hub, session: ClientSession, key: str, **fields: object) -> None:
    spec = p.TaskSpec(key=key, func="f", nb=1, runtime=local_runtime(), **fields)
    hub.submit(session, p.Submit(tasks=[spec], funcs=["f"]),
               [memoryview(b"function"), memoryview(b"payload")])
    commit(hub)


def finish(hub: Hub, conn: ProviderConn, key: str, cpu: float = 0.0) -> None:
    hub.results(conn, p.Results(results=[p.Result(key=key, status="finished", nb=1,
                                                  usage={"cpu_seconds": cpu})]),
                [memoryview(b"result")])
    commit(hub)  # as the shell does: a paid result goes out once its leaf is committed


def test_a_replica_that_cannot_be_funded_refuses_the_whole_task(hub: Hub) -> None:
    conns = [provider(hub, f"p{i}", account=str(i) * 64)[0] for i in range(3)]
    session, peer = client(hub)
    submit(hub, session, "small", budget=1.0, redundancy=3)  # an open vote holds 3 escrows
    hub.billing.ledger.check(live=hub.live_escrows())
    submit(hub, session, "big", budget=4.0, redundancy=3)  # 12 tokens, the account has 7
    [refusal] = peer.results()
    assert refusal.key == "big" and refusal.code == p.ErrorCode.FUNDS.value
    assert refusal.error.type == "InsufficientFunds"
    assert len(hub.billing.ledger.open_escrows()) == 3 and len(hub.tasks) == 3  # "small" only
    assert hub.billing.ledger.balance(CLIENT) == FAUCET - to_micro(3.0)
    hub.cancel(session, ["small"])
    for conn in conns:  # each provider answers the cancel: the final (empty) bill
        for task_id in list(conn.running):
            hub.results(conn, p.Results(results=[p.Result(key=task_id, status="cancelled")]),
                        [])
    commit(hub)
    assert hub.billing.ledger.balance(CLIENT) == FAUCET


def test_a_vanished_providers_failure_costs_what_the_client_lost(hub: Hub) -> None:
    conn, _ = provider(hub)
    session, peer = client(hub)
    submit(hub, session, "lost", budget=5.0, retries=0)
    [a] = conn_assigned = [t for t in hub.tasks.values()]
    assert conn_assigned and a.provider == conn.id
    a.assigned_at -= 2.0  # as if the gateway had seen it run for two seconds
    hub.heartbeat(conn, p.Heartbeat(usage={a.task_id: {"cpu_seconds": 1.5}}))
    hub.leave_provider(conn.id)
    commit(hub)
    [failure] = peer.results()
    assert failure.error.type == "ProviderLost"
    lost = FAUCET - hub.billing.ledger.balance(CLIENT)
    assert lost == to_micro(1.5) and to_micro(failure.cost) == lost


def test_a_resubmission_after_a_restart_is_not_charged_twice(db: Path) -> None:
    first, ledger = gateway(db)
    conn, _ = provider(first)
    session, peer = client(first, "resumed")
    submit(first, session, "k", budget=5.0)
    [task] = first.tasks.values()
    task.assigned_at -= 1.0
    finish(first, conn, task.task_id, cpu=0.8)
    [done] = peer.results()
    assert to_micro(done.cost) == to_micro(0.8)
    stop(first, ledger)  # the gateway dies; the client never got that result

    again, ledger = gateway(db)  # restarted on the same ledger
    try:
        conn2, prov = provider(again)
        session2, peer2 = client(again, "resumed")  # the client resubmits under its session
        client_before = ledger.balance(CLIENT)
        provider_before = ledger.balance(PROVIDER)
        submit(again, session2, "k", budget=5.0)
        submit(again, session2, "new", budget=5.0)
        by_key = {t.key: t for t in again.tasks.values()}
        assert by_key["k"].prepaid and by_key["k"].escrow_micro == 0
        assert not by_key["new"].prepaid and by_key["new"].escrow_micro == to_micro(5.0)
        assert {a.key for a in prov.assigned()} == {t.task_id for t in by_key.values()}
        for t in by_key.values():
            t.assigned_at -= 1.0
            finish(again, conn2, t.task_id, cpu=0.5)
        costs = {r.key: r.cost for r in peer2.results()}
        assert costs["k"] == 0.0  # paid once, before the restart
        assert client_before - ledger.balance(CLIENT) == to_micro(costs["new"]) == to_micro(0.5)
        assert ledger.balance(PROVIDER) - provider_before == to_micro(0.5)  # "k" paid nobody
        assert ledger.open_escrows() == {}
        ledger.check(live=())
    finally:
        stop(again, ledger)


def test_balance_says_what_is_available_and_what_is_held(hub: Hub) -> None:
    conn, _ = provider(hub)
    session, _ = client(hub)
    submit(hub, session, "held", budget=3.0)
    reply = hub.query(CLIENT, session.id, p.Query(id=1, what="balance"))
    assert reply.data == {"available": 7.0, "held": 3.0}
    [task] = hub.tasks.values()
    finish(hub, conn, task.task_id)
    reply = hub.query(CLIENT, session.id, p.Query(id=2, what="balance"))
    assert reply.data == {"available": 10.0, "held": 0.0}


def test_free_tasks_hold_nothing_and_never_reach_a_priced_provider(hub: Hub) -> None:
    paid, paid_peer = provider(hub, "paid")
    free, free_peer = provider(hub, "free", price=0.0, account="e" * 64)
    session, peer = client(hub)
    for key, fields in (("zero", {"budget": 0.0}), ("nocpu", {"resources": {"cpus": 0}}),
                        ("tiny", {"budget": 0.5})):
        submit(hub, session, key, **fields)
    assert not paid_peer.assigned() and len(free_peer.assigned()) == 3
    assert hub.billing.ledger.open_escrows() == {}
    for t in list(hub.tasks.values()):
        finish(hub, free, t.task_id, cpu=0.1)
    assert {r.cost for r in peer.results()} == {0.0}
    assert [t.reason for t in hub.billing.ledger.history(CLIENT)] == ["faucet"]


def test_a_free_task_left_with_only_priced_providers_fails_clearly(hub: Hub) -> None:
    paid, paid_peer = provider(hub, "paid")
    free, _ = provider(hub, "free", price=0.0, account="e" * 64)
    session, peer = client(hub)
    submit(hub, session, "z", budget=0.0, retries=1)
    [task] = hub.tasks.values()
    assert task.provider == free.id and task.escrow_micro == 0
    hub.leave_provider(free.id)  # the free provider goes; only the priced one is left
    assert task.state.value == "pending" and not paid_peer.assigned()
    hub.sweep(time.monotonic() + 120)  # past the grace a provider has to come back
    [failure] = peer.results()
    assert failure.key == "z" and "free provider" in failure.error.message
    assert not paid_peer.assigned() and not hub.tasks
