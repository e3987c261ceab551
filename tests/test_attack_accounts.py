"""Attacks on identity: a provider taking another's name, one that grabs tasks and drops them
across reconnects, and the honest case those defences must not break (a provider that reconnects
keeps its id, and tasks pinned to it wait for it).

Providers are judged per *account*: names are bound to the first account that registers them (in
the gateway's database), tries and losses are counted per account, and an account that keeps
losing tasks is benched, however many connections it opens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gate, hold, start_gateway, start_provider
from fakes import FakeProvider
from helpers import wait_for

from gateway import protocol as p
from gateway.identity import Identity
from gateway.registry import stable_id
from gateway.standing import BENCH_AFTER, INITIAL_ALLOWANCE
from notebook_ext import Client, NoMatchingProvider

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def drain(fake: FakeProvider) -> list[p.Assignment]:
    out = []
    while not fake.assigned.empty():
        out.append(fake.assigned.get_nowait()[0])
    return out


def test_a_provider_under_another_accounts_name_never_gets_its_pinned_tasks(
        tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "gw")
    try:
        owner_key = Identity.load_or_create(tmp_path / "owner")
        with FakeProvider(gw.url, tmp_path / "owner", name="gpu-box") as owner:
            assert owner.id == stable_id("gpu-box", owner.account)
        with FakeProvider(gw.url, tmp_path / "impostor", name="gpu-box") as impostor, \
                Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            warning = impostor.other.get(timeout=10)  # told, not silently demoted
            assert isinstance(warning, p.Error) and "belongs to another account" in warning.message
            with pytest.raises(NoMatchingProvider, match="not among the requested"):
                c.submit(square, 2, providers=["gpu-box"]).result(10)
            assert impostor.assigned.empty()
            # the owner comes back: its name reaches it, the impostor still gets nothing
            with FakeProvider(gw.url, tmp_path / "owner", name="gpu-box",
                              identity=owner_key) as owner:
                fut = c.submit(square, 3, providers=["gpu-box"])
                assignment, _ = owner.next_assignment()
                owner.finish(assignment.key, 9)
                assert fut.result(10) == 9 and fut.provider == owner.id
            assert impostor.assigned.empty()
        # the binding is in the gateway's database: a restart does not hand the name over
        gw.stop()
        gw = start_gateway(tmp_path / "gw")
        with FakeProvider(gw.url, tmp_path / "impostor", name="gpu-box") as impostor:
            assert "belongs to another account" in impostor.other.get(timeout=10).message
    finally:
        gw.stop()


def sync(fake: FakeProvider) -> list[p.Assignment]:
    """Every assignment the gateway sent so far: a query's reply comes after them."""
    fake.send(p.Query(id=7, what="balance"))
    while not isinstance(fake.other.get(timeout=10), p.Reply):
        pass
    return drain(fake)


def serve_honestly(fake: FakeProvider, n: int) -> None:
    """Run ``n`` assignments of ``square`` as a real provider would (the test trusts its own
    pickles) and report each."""
    for _ in range(n):
        assignment, payload = fake.next_assignment()
        (x,), _ = cloudpickle.loads(payload[0])
        fake.finish(assignment.key, square(x))


def test_grab_and_drop_across_reconnects_is_benched(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "gw")
    try:
        grabber_key = Identity.load_or_create(tmp_path / "grabber")
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            futs = c.map(square, range(40), retries=10, chunksize=1)  # one assignment each
            for round_ in range(BENCH_AFTER):
                with FakeProvider(gw.url, tmp_path / "grabber", name="grabber", cpus=4096,
                                  identity=grabber_key) as grabber:
                    grabbed = sync(grabber)
                    # believed only up to what it delivered (nothing): the slow-start allowance,
                    # halved by each drop, never its 4,096 CPUs
                    assert 0 < len(grabbed) <= INITIAL_ALLOWANCE >> round_, (round_, grabbed)
                    assert grabber.id == stable_id("grabber", grabber.account)  # same id each time
                # dropped: the connection ends holding everything it took
            with FakeProvider(gw.url, tmp_path / "grabber", name="grabber", cpus=4096,
                              identity=grabber_key) as benched, \
                    FakeProvider(gw.url, tmp_path / "honest", name="honest") as honest:
                serve_honestly(honest, len(futs))
                assert c.gather(futs) == [x * x for x in range(40)]
                assert sync(benched) == []  # benched: nothing, although it reconnected
                assert {f.provider for f in futs} == {honest.id}
    finally:
        gw.stop()


def test_a_provider_that_reconnects_keeps_its_id_and_its_pinned_tasks(tmp_path: Path,
                                                                       gate: Gate) -> None:
    gw = start_gateway(tmp_path / "gw")
    steady = start_provider(gw, tmp_path, "steady")
    try:
        gw.wait_providers(1)
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as c:
            (info,) = c.providers()
            pid = info.id
            assert pid == stable_id("steady", info.account)
            running = c.submit(hold, str(gate), providers=[pid])
            waiting = c.submit(square, 5, providers=[pid], key="pinned-before-the-blip")
            wait_for(lambda: running.status == "running", 30, message="the pinned task running")
            steady.sigkill()  # the blip: the provider's process dies
            gw.wait_providers(0)
            assert not waiting.done() and not running.done()  # they wait for it
            steady = start_provider(gw, tmp_path, "steady")  # same DECOMPUTE_HOME and name
            gw.wait_providers(1)
            assert [i.id for i in c.providers()] == [pid]
            gate.open()
            assert waiting.result(60) == 25 and waiting.provider == pid
            assert running.result(60) is True and running.provider == pid
    finally:
        steady.stop()
        gw.stop()
