"""Attacks on availability: providers that hold tasks and never answer, cancels nobody confirms,
keys too long for the ids derived from them, bad frames, and one client's 100,000-task storm.

Each test is the attack first (a :class:`fakes.FakeProvider` or :class:`fakes.FakeClient` that
speaks the wire protocol, or a task that misbehaves), then the defence it meets: the gateway keeps
its own deadlines (a lease renewed by heartbeats, ``timeout=`` plus a grace, a cancel grace), one
bad thing never ends a connection, and placement stays fair and cheap under hostile volume.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gate, Gateway, hold, start_gateway, start_provider
from fakes import FakeClient, FakeProvider
from helpers import http_get, wait_for

from gateway import protocol as p
from notebook_ext import Client, GatewayRefused
from notebook_ext.serialize import dumps_args, dumps_function, local_runtime

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: The gateway's deadlines, short so that these tests take seconds.
LEASE = 2.0
CANCEL_GRACE = 2.0


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


@pytest.fixture
def deadline_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway with no providers of its own and short lease and cancel grace."""
    gw = start_gateway(tmp_path / "gw", extra=("--lease-seconds", str(LEASE),
                                                "--cancel-grace", str(CANCEL_GRACE)))
    yield gw
    gw.stop()


def running_on_gateway(gw: Gateway) -> int:
    return gw.health()["tasks"]["running"]


def metric(gw: Gateway, name: str) -> float:
    """One sample of the gateway's /metrics (0 if absent)."""
    status, body = http_get(gw.port, "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(f"decompute_{name} "):
            return float(line.split()[-1])
    return 0.0


# --------------------------------------------------------------------------- deadlines


@pytest.fixture
def plain_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway with no providers of its own and the default deadlines."""
    gw = start_gateway(tmp_path / "gw")
    yield gw
    gw.stop()


def test_a_provider_that_never_answers_cannot_hold_a_timed_task(plain_gateway: Gateway,
                                                                tmp_path: Path) -> None:
    gw = plain_gateway
    with FakeProvider(gw.url, tmp_path / "silent", name="silent", prices={"cpu": 0.01}) as silent, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
        before = c.balance()
        start = time.monotonic()
        fut = c.submit(square, 3, timeout=2, providers=[silent.account])
        assignment, _ = silent.next_assignment()
        with pytest.raises(TimeoutError, match="ran past its timeout of 2 s"):
            fut.result(30)
        took = time.monotonic() - start
        print(f"\ntimeout=2 on a provider that never answers: failed after {took:.1f} s")
        assert took < 2 + 10
        assert silent.cancelled.get(timeout=5) == assignment.key  # told to stop it
        after = wait_for(lambda: (b := c.balance()) == before and b, 10,
                         message="escrow released")
        assert getattr(after, "held", 0.0) == 0.0
        assert running_on_gateway(gw) == 0


def test_a_lapsed_lease_runs_the_task_elsewhere_and_heartbeats_renew_it(
        deadline_gateway: Gateway, tmp_path: Path) -> None:
    gw = deadline_gateway
    with FakeProvider(gw.url, tmp_path / "keeper", name="keeper") as keeper, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
        fut = c.submit(square, 4)
        assignment, _ = keeper.next_assignment()
        renewing_until = time.monotonic() + 2 * LEASE
        while time.monotonic() < renewing_until:  # a heartbeat naming the task: lease renewed
            keeper.heartbeat({assignment.key: {}})
            assert keeper.cancelled.empty(), "taken back although its provider reports it"
            time.sleep(LEASE / 4)  # the heartbeat's pace, as a provider's own timer
        with FakeProvider(gw.url, tmp_path / "finisher", name="finisher") as finisher:
            again, _ = finisher.next_assignment(timeout=LEASE + 10)  # silent now: taken back
            assert again.key == assignment.key
            finisher.finish(again.key, 16)
            assert fut.result(10) == 16
            assert fut.provider == finisher.id
        assert keeper.cancelled.get(timeout=5) == assignment.key


def test_a_cancel_nobody_confirms_frees_the_slot_after_the_grace(deadline_gateway: Gateway,
                                                                 tmp_path: Path) -> None:
    gw = deadline_gateway
    with FakeProvider(gw.url, tmp_path / "deaf", name="deaf") as deaf, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
        fut = c.submit(square, 5)
        assignment, _ = deaf.next_assignment()
        deaf.heartbeat({assignment.key: {}})
        assert fut.cancel() is True
        assert deaf.cancelled.get(timeout=5) == assignment.key
        wait_for(lambda: running_on_gateway(gw) == 0, CANCEL_GRACE + 5,
                 message="the slot freed after the cancel grace")


def test_twelve_submit_and_cancel_rounds_leave_every_slot_free(tmp_path: Path,
                                                               gate: Gate) -> None:
    # a cancel grace far longer than the test: every slot must be freed by the provider's own
    # confirmation (also of tasks cancelled while still queued there), not by the grace
    gw = start_gateway(tmp_path / "gw", local_providers=1, extra=("--cancel-grace", "300"))
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            for _ in range(12):
                c.submit(hold, str(gate)).cancel()
            start = time.monotonic()
            fut = c.submit(add, 1, 1)
            wait_for(lambda: fut.status in ("running", "finished"), 5,
                     message="a new task started")
            print(f"\nafter 12 submit-and-cancel rounds a new task started in "
                  f"{time.monotonic() - start:.2f} s")
            assert fut.result(30) == 2
            wait_for(lambda: gw.health()["tasks"] == {"pending": 0, "running": 0}, 5,
                     message="every slot free, each cancel confirmed by the provider")
    finally:
        gw.stop()


# --------------------------------------------------------------------------- one bad thing


def test_a_key_too_long_for_its_derived_id_is_refused_and_nobody_is_disconnected(
        gateway: Gateway, client: Client, tmp_path: Path) -> None:
    providers_before = metric(gateway, 'connections_total{role="provider"}')
    names = sorted(gateway.health()["provider_names"])
    with pytest.raises(GatewayRefused, match="too long"):
        client.submit(add, 1, 2, key="k" * 256).result(15)
    with pytest.raises(GatewayRefused, match="too long"):
        client.submit(add, 1, 2, key="r" * 240, redundancy=2).result(15)
    assert client.map(square, range(20)) and client.gather(client.map(square, range(20))) == [
        x * x for x in range(20)]
    assert sorted(gateway.health()["provider_names"]) == names
    assert metric(gateway, 'connections_total{role="provider"}') == providers_before


def test_a_task_a_provider_refuses_fails_alone(deadline_gateway: Gateway, tmp_path: Path) -> None:
    gw = deadline_gateway
    with FakeProvider(gw.url, tmp_path / "picky", name="picky") as picky, \
            Client(gw.url, home=tmp_path / "a", stream_output=False) as a, \
            Client(gw.url, home=tmp_path / "b", stream_output=False) as b:
        refused = a.submit(square, 6, retries=0)
        assignment, _ = picky.next_assignment()
        picky.fail(assignment.key, "assignment refused: it breaks this provider's limits")
        with pytest.raises(RuntimeError, match="refused"):
            refused.result(10)
        other = b.submit(square, 7)
        assignment, _ = picky.next_assignment()
        picky.finish(assignment.key, 49)
        assert other.result(10) == 49
        assert not picky.closed.is_set()


# --------------------------------------------------------------------------- hostile volume


def fail_when_opened(deps: dict, gate: str) -> None:
    """The root of the hostile chain: fails, but only once every link has been submitted."""
    hold(gate, 120)
    raise RuntimeError("the root of the chain fails on purpose")


def link(deps: dict) -> int:
    return 1


def chain_specs(n: int, gate: str, providers: list[str]
                ) -> list[tuple[p.TaskSpec, str, list[bytes]]]:
    """A chain x0 <- x1 <- ... of ``n`` graph tasks whose root fails."""
    root_hash, _ = dumps_function(fail_when_opened)
    link_hash, _ = dumps_function(link)
    runtime = local_runtime()
    empty, root_args = dumps_args((), {}), dumps_args((gate,), {})
    out = [(p.TaskSpec(key="x0", func=root_hash, nb=len(root_args), runtime=runtime, deps=[],
                       keep=True, send=False, retries=0, providers=providers),
            root_hash, root_args)]
    for i in range(1, n):
        out.append((p.TaskSpec(key=f"x{i}", func=link_hash, nb=len(empty), runtime=runtime,
                               deps=[f"x{i - 1}"], keep=True, send=False, retries=0,
                               providers=providers),
                    link_hash, empty))
    return out


def submit_in_frames(hostile: FakeClient, items: list, funcs: dict[str, bytes]) -> None:
    for i in range(0, len(items), p.MAX_BATCH):
        batch = items[i:i + p.MAX_BATCH]
        used = {h for _, h, _ in batch}
        hostile.submit([s for s, _, _ in batch], {h: funcs[h] for h in used},
                       [bufs for _, _, bufs in batch])


class RoundTrips(threading.Thread):
    """Another client's trivial task, one after another, timed, until stopped."""

    def __init__(self, client: Client, provider: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.provider = provider
        self.times: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                assert self.client.submit(add, i, 1, providers=[self.provider]).result(30) == i + 1
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return
            self.times.append(time.monotonic() - start)
            i += 1

    def p99(self) -> float:
        return statistics.quantiles(self.times, n=100)[98] if len(self.times) > 2 else max(
            self.times)


@pytest.mark.timeout(300)
def test_a_100000_task_storm_does_not_stall_another_client(tmp_path: Path, gate: Gate) -> None:
    gw = start_gateway(tmp_path / "gw", extra=("--faucet", "1000"))
    victim_provider = start_provider(gw, tmp_path, "victims", cpus=2)  # a slot for the root
    gw.wait_providers(1)
    n = 100_000
    try:
        with FakeProvider(gw.url, tmp_path / "sink", name="sink") as sink, \
                FakeClient(gw.url, tmp_path / "hostile") as hostile, \
                Client(gw.url, home=tmp_path / "victim", stream_output=False) as victim:
            assert victim.submit(add, 0, 1, providers=["victims"]).result(60) == 1  # warm
            trips = RoundTrips(victim, "victims")
            trips.start()
            storm_start = time.monotonic()
            # 1. a free 100,000-task chain whose root fails once all of it is in
            funcs = dict([dumps_function(fail_when_opened), dumps_function(link)])
            submit_in_frames(hostile, chain_specs(n, str(gate), ["victims"]), funcs)
            wait_for(lambda: metric(gw, "graph_results_kept") >= n, 120,
                     message="the chain submitted")
            gate.open()
            failed = hostile.wait_results(n, 120)
            assert all(r.status == "error" and "on purpose" in r.error.message for r in failed)
            chain_done = time.monotonic()
            # 2. 100,000 tasks that wait (pinned to a provider that holds what it takes), cancelled
            fhash, fblob = dumps_function(square)
            args = dumps_args((1,), {})
            pending = [(p.TaskSpec(key=f"p{i}", func=fhash, nb=len(args), runtime=local_runtime(),
                                   providers=[sink.id]), fhash, args) for i in range(n)]
            submit_in_frames(hostile, pending, {fhash: fblob})
            wait_for(lambda: gw.health()["tasks"]["pending"] >= n - 100, 120,
                     message="the storm queued")
            for i in range(0, n, p.MAX_BATCH):
                hostile.send(p.Cancel(keys=[f"p{j}" for j in range(i, min(n, i + p.MAX_BATCH))]))
            cancelled = hostile.wait_results(n, 120)
            assert {r.status for r in cancelled} == {"cancelled"}
            wait_for(lambda: gw.health()["tasks"]["pending"] == 0, 30, message="queue empty")
            trips.stop.set()
            trips.join(60)
            assert not trips.errors, trips.errors
            print(f"\nanother client's round trips during the storm: {len(trips.times)}, "
                  f"median {statistics.median(trips.times) * 1000:.0f} ms, p99 "
                  f"{trips.p99() * 1000:.0f} ms, max {max(trips.times) * 1000:.0f} ms "
                  f"(the chain had failed {chain_done - storm_start:.1f} s in)")
            assert trips.p99() < 2.0  # the goal is 1 s; generous on a shared 2-core machine
    finally:
        victim_provider.stop()
        gw.stop()


def test_a_malformed_query_gets_an_error_reply_and_the_connection_lives(
        plain_gateway: Gateway, tmp_path: Path) -> None:
    """Found by the fuzzer: a ``resume`` query whose ``keys`` is a float once closed the client's
    connection with an internal error. Now it is answered with an error, and the same
    connection keeps being served."""
    with FakeClient(plain_gateway.url, tmp_path / "hostile") as hostile:
        for i, keys in enumerate([float("nan"), 7, "abc", {"a": 1}]):
            hostile.send(p.Query(id=i, what="resume", args={"keys": keys}))
            reply = hostile.other.get(timeout=20)
            assert isinstance(reply, p.Reply) and reply.id == i
            assert reply.error and "keys must be a list" in reply.error
        hostile.send(p.Query(id=99, what="resume", args={"keys": ["k"]}))
        reply = hostile.other.get(timeout=20)
        assert isinstance(reply, p.Reply) and reply.data == {"unknown": ["k"]}
