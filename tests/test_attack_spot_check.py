"""Issue 14, spot checks: a provider that returns wrong results is caught, unpaid, and its work
checked; the client gets only correct results (or is told).

Real gateway process and SQLite ledger; providers are :class:`cheating_provider.WorkingFake`
connections (three honest accounts, one cheater) that compute what they are sent. Money is
audited after each test by conftest's ``attack_books`` (conserved, no escrow left held).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import cloudpickle
import pytest
from cheating_provider import WorkingFake
from conftest import Gateway, start_gateway
from fakes import FakeProvider
from helpers import http_get, wait_for

from gateway.ledger import Ledger, to_micro
from notebook_ext import BudgetExceeded, Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks are defined here

PRICE = 1.0


def square(x: int) -> int:
    return x * x


def square_is_right(result: int, x: int) -> bool:
    return result == x * x


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("spot-check"), extra=("--spot-seed", "7"))
    yield gateway
    gateway.stop()


def balance(gw: Gateway, account: str) -> int:
    with Ledger(gw.home.parent / "ledger.sqlite") as led:
        return led.balance(account)


def network(stack: ExitStack, gw: Gateway, tmp: Path, lie_rate: float,
            seed: int) -> tuple[list[WorkingFake], WorkingFake]:
    honest = [stack.enter_context(WorkingFake(gw.url, tmp / f"h{i}", name=f"honest-{i}",
                                              prices={"cpu": PRICE}, work=0.01))
              for i in range(3)]
    cheater = stack.enter_context(WorkingFake(gw.url, tmp / "cheat", name="cheater",
                                              prices={"cpu": PRICE}, lie_rate=lie_rate,
                                              seed=seed))
    return honest, cheater


def gateway_checks(gw: Gateway) -> tuple[int, int]:
    """The gateway's counts: check tasks run, runs out-voted (providers caught)."""
    _, body = http_get(gw.port, "/metrics")
    found = dict(re.findall(r"^decompute_(spot_checks_\w+) (\S+)$", body, re.M))
    return int(float(found["spot_checks_run"])), int(float(found["spot_checks_failed"]))


def checks_of(futures: list) -> int:
    """Check tasks the gateway ran for these futures (re-runs and check-function runs)."""
    return sum(f.verification["runs"] - 1 + f.verification["checks"] for f in futures
               if f.verification and f.verification.get("checked"))


def test_spot_check_1_every_result_is_correct_and_the_cheater_earns_nothing(
        gw: Gateway, tmp_path: Path) -> None:
    with ExitStack() as stack:
        honest, cheater = network(stack, gw, tmp_path, lie_rate=1.0, seed=1)
        client = stack.enter_context(Client(gw.url, home=tmp_path / "client",
                                            stream_output=False))
        before, client_before = balance(gw, cheater.account), balance(gw, client.account)
        run_before, failed_before = gateway_checks(gw)
        t0 = time.monotonic()
        futures = client.map(square, range(50), spot_check=1.0)
        results = [f.result(60) for f in futures]
        took = time.monotonic() - t0
        assert results == [x * x for x in range(50)]
        assert all(f.verification["checked"] for f in futures)
        assert cheater.lies, "the cheater got no task: the test proves nothing"
        assert balance(gw, cheater.account) == before
        reputation = {p.name: p.reputation for p in client.providers()}
        assert reputation["cheater"] < min(reputation[h.ad.name] for h in honest), reputation
        caught = [f for f in futures if f.verification["passed"] is False]
        assert caught and all(f.provider != cheater.id for f in futures)
        lost = client_before - balance(gw, client.account)
        assert lost == to_micro(sum(f.cost for f in futures)) > 0
        run, failed = gateway_checks(gw)
        assert run - run_before == checks_of(futures)
        print(f"\nspot_check=1.0, 50 tasks: {took:.2f} s, {run - run_before} check tasks, "
              f"{failed - failed_before} runs out-voted, cheater lied {len(cheater.lies)} "
              f"times, {len(caught)} results caught")


def test_spot_check_0_2_catches_a_30_percent_liar_and_checks_its_other_results(
        gw: Gateway, tmp_path: Path) -> None:
    with ExitStack() as stack:
        _, cheater = network(stack, gw, tmp_path, lie_rate=0.3, seed=3)
        client = stack.enter_context(Client(gw.url, home=tmp_path / "client",
                                            stream_output=False))
        run_before, failed_before = gateway_checks(gw)
        t0 = time.monotonic()
        futures = client.map(square, range(200), spot_check=0.2, check=square_is_right)
        values = [f.result(60) for f in futures]
        caught = [f for f in futures if f.verification.get("passed") is False]
        assert caught, "the cheater was not caught in 200 tasks"
        by_cheater = [f for f in futures if f.provider == cheater.id]
        # every result it delivered unchecked is checked late, and the client told
        wait_for(lambda: all(f.verification.get("checked") for f in by_cheater), 30,
                 message="the cheater's unchecked results checked")
        took = time.monotonic() - t0
        for f, x in zip(futures, range(200), strict=True):
            if values[futures.index(f)] != x * x:  # a lie delivered before the catch
                assert f.verification["late"] and f.verification["passed"] is False, (
                    x, f.verification)
        late = [f for f in futures if f.verification.get("late")]
        reputation = {p.name: p.reputation for p in client.providers()}
        assert reputation["cheater"] == min(reputation.values()), reputation
        run, failed = gateway_checks(gw)
        print(f"\nspot_check=0.2, 200 tasks: {took:.2f} s, {run - run_before} check tasks, "
              f"{failed - failed_before} runs out-voted, "
              f"cheater ran {cheater.ran} (lied {len(cheater.lies)}), {len(caught)} lies "
              f"caught, {len(late)} late checks, "
              f"{sum(1 for f in futures if f.verification.get('checked'))} results checked")


def test_a_result_held_for_its_check_is_cancelled_unpaid_and_its_check_stopped(
        gw: Gateway, tmp_path: Path) -> None:
    with FakeProvider(gw.url, tmp_path / "a", name="held-a", prices={"cpu": PRICE}) as a, \
            FakeProvider(gw.url, tmp_path / "b", name="held-b", prices={"cpu": PRICE}) as b, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        before = {f.account: balance(gw, f.account) for f in (a, b)}
        client_before = balance(gw, client.account)
        fut = client.submit(square, 3, spot_check=1.0, providers=["held-a", "held-b"])
        first, second = a, b
        try:
            assignment, _ = a.next_assignment(5)
        except TimeoutError:
            first, second = b, a
            assignment, _ = b.next_assignment(5)
        first.finish(assignment.key, 9, usage={"cpu_seconds": 0.01})
        check, _ = second.next_assignment()  # the re-run, on the other account
        assert check.key != assignment.key and not fut.done()  # held while it is checked
        fut.cancel()
        assert second.cancelled.get(timeout=10) == check.key
        wait_for(lambda: fut.status == "cancelled", 10, message="the future cancelled")
        wait_for(lambda: balance(gw, client.account) == client_before, 10,  # committed
                 message="both escrows back on the client's balance")
        assert all(balance(gw, f.account) == before[f.account] for f in (a, b))


def test_with_no_other_account_to_check_it_the_result_comes_unchecked_and_says_so(
        gw: Gateway, tmp_path: Path) -> None:
    with WorkingFake(gw.url, tmp_path / "alone", name="alone", prices={"cpu": PRICE}), \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        fut = client.submit(square, 5, spot_check=1.0, providers=["alone"])
        assert fut.result(20) == 25 and fut.cost > 0
        assert fut.verification["checked"] is False
        assert "another account" in fut.verification["note"]


def test_a_spot_checked_task_over_its_budget_stops_unpaid(gw: Gateway, tmp_path: Path) -> None:
    """No heartbeat pays a spot-checked task (its result is not decided yet): at its escrow it
    stops, and nothing is charged."""
    with FakeProvider(gw.url, tmp_path / "slow", name="slow", prices={"cpu": PRICE}) as slow, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        before, client_before = balance(gw, slow.account), balance(gw, client.account)
        fut = client.submit(square, 2, budget=1.5, spot_check=0.5, retries=0,
                            providers=["slow"])
        assignment, _ = slow.next_assignment()
        time.sleep(1.6)  # the gateway believes at most the wall time it saw: let 1.5 s pass
        slow.heartbeat({assignment.key: {"cpu_seconds": 1.55}})
        with pytest.raises(BudgetExceeded, match="checked"):
            fut.result(10)
        assert slow.cancelled.get(timeout=10) == assignment.key
        assert fut.cost == 0.0
        wait_for(lambda: balance(gw, client.account) == client_before, 10,  # committed
                 message="the escrow back on the client's balance")
        assert balance(gw, slow.account) == before


def test_a_check_whose_provider_vanishes_delivers_the_result_unchecked(
        gw: Gateway, tmp_path: Path) -> None:
    with FakeProvider(gw.url, tmp_path / "a", name="van-a", prices={"cpu": PRICE}) as a, \
            FakeProvider(gw.url, tmp_path / "b", name="van-b", prices={"cpu": PRICE}) as b, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        fut = client.submit(square, 4, spot_check=1.0, retries=0, providers=["van-a", "van-b"])
        first, second = (a, b) if wait_for(lambda: a.assigned.qsize() or b.assigned.qsize(),
                                           10, message="placed") and a.assigned.qsize() \
            else (b, a)
        assignment, _ = first.next_assignment()
        first.finish(assignment.key, 16, usage={"cpu_seconds": 0.01})
        second.next_assignment()  # the check
        second.close()  # gone with it, and retries=0
        assert fut.result(20) == 16
        assert fut.verification["checked"] is False and "could not run" in fut.verification["note"]
