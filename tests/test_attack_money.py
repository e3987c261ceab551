"""Issue 9, acceptance 1, 2, 3 and 6: providers that lie about money or data get nothing for it.

Each attack is a :class:`fakes.FakeProvider`, which speaks the wire protocol and sends what the
test says, against a real gateway process and its real SQLite ledger; clients are real
``Client`` objects. After every test the books must be conserved with no escrow left held
(acceptance 12: conftest's ``attack_books`` audits every ``test_attack_*`` file).
"""

from __future__ import annotations

import gc
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from conftest import Gateway, start_gateway
from fakes import FakeProvider, result_buffers
from helpers import http_get, wait_for

from gateway import protocol as p
from gateway.billing import result_hash
from gateway.ledger import Ledger, to_micro
from gateway.receipt_log import check_log_receipt
from notebook_ext import BudgetExceeded, Client, NoMatchingProvider, verify_receipt
from notebook_ext.client import GraphTask

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks are defined here

PRICE = 1.0  # tokens per CPU-second, every priced fake here
FAKE_WORK = 0.3  # seconds a fake "works" before it answers: a wall time the gateway sees


def square(x: int) -> int:
    return x * x


def make(deps: dict, value: Any) -> Any:
    return value


def plus_one(deps: dict) -> int:
    return next(iter(deps.values())) + 1


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("attack-money"))
    yield gateway
    gateway.stop()


def ledger_of(gw: Gateway) -> Path:
    return gw.home.parent / "ledger.sqlite"


def balance(gw: Gateway, account: str) -> int:
    with Ledger(ledger_of(gw)) as led:
        return led.balance(account)


def dropped(gw: Gateway, reason: str) -> float:
    status, body = http_get(gw.port, "/metrics")
    assert status == 200, body
    m = re.search(rf'^decompute_dropped_total{{reason="{reason}"}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def priced(gw: Gateway, home: Path, name: str, **kw: Any) -> FakeProvider:
    return FakeProvider(gw.url, home / name, name=name, prices={"cpu": PRICE}, **kw)


# --------------------------------------------------------------------------- acceptance 1


def test_inflated_usage_is_paid_at_most_the_wall_time_the_gateway_saw(
        gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "inflater") as liar, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        client_before, liar_before = balance(gw, client.account), balance(gw, liar.account)
        t0 = time.monotonic()
        fut = client.submit(square, 7, budget=50, providers=["inflater"], retries=0)
        assignment, _ = liar.next_assignment()
        lie = {"cpu_seconds": 90.0, "wall_seconds": 90.0, "memory_gib_seconds": 1e6,
               "gpu_seconds": 1e6, "max_rss_bytes": 1e15}
        liar.heartbeat({assignment.key: lie})
        wait_for(lambda: fut.usage.get("cpu_seconds") is not None, 10,
                 message="the inflated heartbeat's usage event")
        seen = time.monotonic() - t0
        assert fut.usage["cpu_seconds"] <= seen, fut.usage  # capped at once, live too
        time.sleep(FAKE_WORK)  # the fake "works": the wall time the gateway will observe
        liar.finish(assignment.key, 49, usage=lie)
        assert fut.result(10) == 49
        wall = time.monotonic() - t0
        print(f"\nreported 90 CPU-s; gateway saw at most {wall:.3f} s: paid for "
              f"{fut.usage['cpu_seconds']:.3f} CPU-s, {fut.cost:.6f} tokens")
        assert 0 < fut.usage["cpu_seconds"] <= wall
        assert fut.usage["gpu_seconds"] == 0 and fut.usage["wall_seconds"] <= wall
        assert fut.cost <= wall * PRICE + 1e-6
        receipt = fut.receipt
        assert receipt is not None and verify_receipt(receipt, client.gateway_key)
        assert receipt["usage"]["cpu_seconds"] == fut.usage["cpu_seconds"] <= wall
        assert receipt["amount_micro"] == to_micro(fut.cost)
        assert client_before - balance(gw, client.account) == receipt["amount_micro"]
        assert balance(gw, liar.account) - liar_before == receipt["amount_micro"]  # no fee here


def test_a_huge_final_usage_closes_the_escrow_at_the_cap(gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "huge") as liar, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        before = balance(gw, client.account)
        t0 = time.monotonic()
        fut = client.submit(square, 3, budget=5, providers=["huge"], retries=0)
        assignment, _ = liar.next_assignment()
        time.sleep(FAKE_WORK)
        liar.finish(assignment.key, 9, usage={"cpu_seconds": 1e18, "memory_gib_seconds": 1e18,
                                              "wall_seconds": 1e18})
        assert fut.result(10) == 9
        wall = time.monotonic() - t0
        assert fut.cost <= wall * PRICE + 1e-6
        assert before - balance(gw, client.account) == to_micro(fut.cost)
        with Ledger(ledger_of(gw)) as led:
            assert fut.receipt["task_id"] not in led.open_escrows()  # closed, not left held


# --------------------------------------------------------------------------- acceptance 2


def test_forged_data_and_missing_reports_change_nothing_and_bill_nothing(
        gw: Gateway, tmp_path: Path) -> None:
    forged = result_buffers("forged by mallory")
    with priced(gw, tmp_path, "holder") as holder, priced(gw, tmp_path, "mallory") as mallory, \
            priced(gw, tmp_path, "runner") as runner, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        mallory_before = balance(gw, mallory.account)
        data0, missing0 = dropped(gw, "data_not_asked"), dropped(gw, "missing_not_asked")
        futs = client.submit_graph([GraphTask("x", make, (41,))], budget=5,
                                   providers=["holder"])
        x, _ = holder.next_assignment()
        time.sleep(FAKE_WORK)
        holder.finish(x.key, buffers=[], stored=True, nbytes=64, usage={"cpu_seconds": 0.1})
        wait_for(lambda: futs["x"].done(), 10, message="x finished (kept on the holder)")
        spent = to_micro(futs["x"].cost)

        # unasked: nobody fetched x
        mallory.send(p.Data(keys=[x.key], nbs=[1]), forged)
        mallory.send(p.Data(keys=[], nbs=[], missing=[x.key]))
        wait_for(lambda: dropped(gw, "data_not_asked") == data0 + 1
                 and dropped(gw, "missing_not_asked") == missing0 + 1, 10,
                 message="both forgeries dropped and counted")

        # the client fetches x: the holder is asked; mallory answers first, twice
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(futs["x"].result(30)))
        reader.start()
        assert holder.fetched.get(timeout=10) == x.key
        mallory.send(p.Data(keys=[x.key], nbs=[1]), forged)
        mallory.send(p.Data(keys=[], nbs=[], missing=[x.key]))
        wait_for(lambda: dropped(gw, "data_not_asked") == data0 + 2, 10,
                 message="the forgery during the fetch dropped")
        assert reader.is_alive() and not got  # the forged bytes did not answer the fetch
        holder.send(p.Data(keys=[x.key], nbs=[1]), result_buffers(41))
        reader.join(30)
        assert got == [41]

        # a dependent runs on another provider: x is delivered there from the holder only
        deps = client.submit_graph([GraphTask("y", plus_one, deps=("x",))], send=["y"],
                                   budget=5, providers=["runner"])
        y, _ = runner.next_assignment()
        assert holder.fetched.get(timeout=10) == x.key
        mallory.send(p.Data(keys=[x.key], nbs=[1]), forged)
        wait_for(lambda: dropped(gw, "data_not_asked") == data0 + 3, 10,
                 message="the forgery during the delivery dropped")
        assert runner.data.empty()
        holder.send(p.Data(keys=[x.key], nbs=[1]), result_buffers(41))
        msg, bufs = runner.data.get(timeout=10)
        assert msg.keys == [x.key] and [bytes(b) for b in bufs] == result_buffers(41)
        runner.finish(y.key, 42, usage={"cpu_seconds": 0.1})
        assert deps["y"].result(10) == 42

        # nothing was recomputed or billed because of mallory
        assert holder.assigned.empty() and mallory.assigned.empty()
        assert balance(gw, mallory.account) == mallory_before
        assert dropped(gw, "missing_not_asked") == missing0 + 2
        with Ledger(ledger_of(gw)) as led:
            mine = [t for t in led.history(client.account, 100) if t.reason == "hold"]
        assert len(mine) == 2  # x and y, once each: no recomputation was held for
        assert spent > 0
        # the client lets go of x and y: the holder frees x (and its leaving later recomputes
        # nothing, which the audit after this test checks)
        futs.clear()
        deps.clear()
        gc.collect()
        wait_for(lambda: any(isinstance(m, p.Release) for m in list(holder.other.queue)), 10,
                 message="x released on its holder")


# --------------------------------------------------------------------------- acceptance 3


def test_redundancy_pays_only_agreeing_replicas_and_never_two_of_one_account(
        gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "honest-a") as a, priced(gw, tmp_path, "honest-b") as b, \
            priced(gw, tmp_path, "liar-1") as liar:
        twin = FakeProvider(gw.url, tmp_path / "liar-1", name="liar-2", prices={"cpu": PRICE},
                            identity=liar.identity).start()  # a second connection, one account
        try:
            with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
                _vote(gw, client, a, b, liar, twin)
        finally:
            twin.close()


def _vote(gw: Gateway, client: Client, a: FakeProvider, b: FakeProvider,
          liar: FakeProvider, twin: FakeProvider) -> None:
    fakes = [a, b, liar, twin]
    before = {f.account: balance(gw, f.account) for f in fakes}
    client_before = balance(gw, client.account)
    fut = client.submit(square, 6, budget=5, redundancy=3, retries=0,
                        providers=["honest-a", "honest-b", "liar-1", "liar-2"])
    held: dict[str, tuple[FakeProvider, p.Assignment]] = {}

    def three() -> bool:
        for f in fakes:
            while not f.assigned.empty():
                held[f.ad.name] = (f, f.assigned.get()[0])
        return len(held) == 3

    wait_for(three, 15, message="three replicas placed")
    assert not {"liar-1", "liar-2"} <= held.keys(), held.keys()  # one account, one replica
    assert {"honest-a", "honest-b"} <= held.keys()
    lying = next(f for name, (f, _) in held.items() if name.startswith("liar"))
    lie_key = held[lying.ad.name][1].key
    # during the vote, an inflated heartbeat moves no tokens (usage only)
    lying.heartbeat({lie_key: {"cpu_seconds": 50.0}})
    wait_for(lambda: fut.usage.get("cpu_seconds") is not None, 10, message="a usage event")
    assert balance(gw, lying.account) == before[lying.account]
    time.sleep(FAKE_WORK)
    lying.finish(lie_key, 999, usage={"cpu_seconds": 50.0})
    for name in ("honest-a", "honest-b"):
        f, assignment = held[name]
        f.finish(assignment.key, 36, usage={"cpu_seconds": 0.2})
    assert fut.result(15) == 36
    lost = client_before - balance(gw, client.account)
    print(f"\nclient lost {lost} micro; fut.cost {fut.cost}; the liar was paid "
          f"{balance(gw, lying.account) - before[lying.account]}")
    assert to_micro(fut.cost) == lost > 0
    assert balance(gw, lying.account) == before[lying.account]
    paid = sum(balance(gw, f.account) - before[f.account] for f in (a, b))
    assert paid == lost and all(balance(gw, f.account) > before[f.account] for f in (a, b))
    settled = check_log_receipt(fut.receipt, client.gateway_key)  # one leaf for the whole vote
    shares = {s["account"]: s["paid_micro"] for s in settled["providers"]}
    assert settled["amount_micro"] == lost and shares.get(lying.account, 0) == 0
    assert {a.account, b.account} <= shares.keys() and settled["outcome"] == result_hash(
        [memoryview(b) for b in result_buffers(36)])


def test_a_replica_over_its_budget_stops_the_vote_and_nobody_is_paid(
        gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "r-one") as one, priced(gw, tmp_path, "r-two") as two, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        before = balance(gw, client.account)
        fut = client.submit(square, 2, budget=1.5, redundancy=2, retries=0,
                            providers=["r-one", "r-two"])
        a, _ = one.next_assignment()
        two.next_assignment()
        time.sleep(1.6)  # the gateway's clock must allow 1.5 CPU-s before the cap lets it count
        one.heartbeat({a.key: {"cpu_seconds": 1.55}})
        with pytest.raises(BudgetExceeded, match="replicas"):
            fut.result(10)
        assert fut.cost == 0.0 and balance(gw, client.account) == before
        assert wait_for(lambda: one.cancelled.qsize() and two.cancelled.qsize(), 10,
                        message="both replicas cancelled")


# --------------------------------------------------------------------------- acceptance 6


def test_budget_zero_and_cpus_zero_never_run_on_a_priced_provider(
        gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "only-priced") as paid, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        for kwargs in ({"budget": 0}, {"resources": {"cpus": 0}}, {"budget": 0.5}):
            fut = client.submit(square, 2, providers=["only-priced"], retries=0, **kwargs)
            with pytest.raises(NoMatchingProvider, match="priced|escrow"):
                fut.result(10)
        assert paid.assigned.empty()
        with FakeProvider(gw.url, tmp_path / "free", name="free-one") as free:
            futs = [client.submit(square, 3, providers=["only-priced", "free-one"], **kwargs)
                    for kwargs in ({"budget": 0}, {"resources": {"cpus": 0}})]
            for _ in futs:
                assignment, _ = free.next_assignment()
                free.finish(assignment.key, 9)
            assert [f.result(10) for f in futs] == [9, 9]
            assert [f.cost for f in futs] == [0.0, 0.0] and all(f.receipt is None for f in futs)
        assert paid.assigned.empty()
        with Ledger(ledger_of(gw)) as led:  # free tasks wrote nothing to the ledger
            assert [t.reason for t in led.history(client.account)] == ["faucet"]


def test_results_events_and_usage_from_a_provider_not_assigned_are_dropped(
        gw: Gateway, tmp_path: Path) -> None:
    with priced(gw, tmp_path, "worker") as worker, priced(gw, tmp_path, "intruder") as intruder, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        before = {r: dropped(gw, r) for r in ("result_not_assigned", "event_not_assigned",
                                              "usage_not_assigned")}
        intruder_before = balance(gw, intruder.account)
        fut = client.submit(square, 5, budget=5, providers=["worker"], retries=0)
        assignment, _ = worker.next_assignment()
        key = assignment.key
        intruder.heartbeat({key: {"cpu_seconds": 0.1}})
        intruder.send(p.Events(events=[p.Event(key=key, kind="output", stream="stdout",
                                               text="injected\n")]))
        intruder.finish(key, 666, usage={"cpu_seconds": 0.1})
        wait_for(lambda: all(dropped(gw, r) == before[r] + 1 for r in before), 10,
                 message="the intruder's result, event and usage dropped and counted")
        assert not fut.done() and not any("injected" in text for _, text in fut.output)
        time.sleep(FAKE_WORK)
        worker.finish(key, 25, usage={"cpu_seconds": 0.1})
        assert fut.result(10) == 25
        assert balance(gw, intruder.account) == intruder_before
        # a repeat of a result already taken is dropped too (the first report counts)
        worker.finish(key, 666, usage={"cpu_seconds": 0.2})
        wait_for(lambda: dropped(gw, "result_not_assigned") == before["result_not_assigned"] + 2,
                 10, message="the repeated result dropped")
        assert fut.result() == 25
