"""Issue 14, acceptance 3: refereed delegation (``client.refereed``, Gensyn's Verde).

Against a real gateway and its ledger: an honest pair (a real provider process and an honest
in-process runner) agrees with no referee run; a provider that skips step 37 of 100 (K=10) is
caught: the dispute is bisected to steps 30-39, the referee re-runs only those, and the honest
provider alone (with the referee) is paid; the cheater earns nothing and has the lowest
reputation. The gateway decides: the client only reads the verdict.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cheaters import StepRunner
from conftest import REPO, Gateway, start_gateway
from helpers import spawn, wait_for
from money_audit import books_settle

from gateway.ledger import Ledger
from notebook_ext import Client, verify_receipt
from notebook_ext.refereed import decode_state, encode_state

PRICES = {"cpu": 1.0}


def walk(state: np.ndarray, i: int) -> np.ndarray:
    """A deterministic float64 step: every step changes the state."""
    return np.tanh(state * 1.01 + np.sin(i + np.arange(state.size, dtype=np.float64)))


def run_locally(state: np.ndarray, n: int) -> np.ndarray:
    for i in range(n):
        state = walk(state, i)
    return state


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path, str]]:
    """A gateway and one honest priced provider process (its account returned)."""
    tmp = tmp_path_factory.mktemp("refereed")
    gw = start_gateway(tmp)
    home = tmp / "provider-honest"
    home.mkdir()
    proc = spawn([sys.executable, "-m", "provider", gw.url, "--name", "honest", "--cpus", "1",
                  "--price-cpu", "1"], home, tmp / "provider-honest.log", REPO)
    try:
        gw.wait_providers(1)
        yield gw, tmp, "honest"
    finally:
        from conftest import stop_process
        stop_process(proc)
        gw.stop()


def earnings(gw: Gateway, account: str) -> int:
    with Ledger(gw.home.parent / "ledger.sqlite") as led:
        return led.earnings(account)


def test_state_encoding_is_canonical() -> None:
    a = np.linspace(0, 1, 7)
    assert encode_state(a) == encode_state(a.copy())
    assert np.array_equal(decode_state(encode_state(a)), a)
    assert decode_state(encode_state((1, 2.5))) == (1, 2.5)


def test_an_honest_pair_agrees_without_a_referee(net: tuple[Gateway, Path, str],
                                                 tmp_path: Path) -> None:
    gw, _, honest = net
    with StepRunner(gw.url, tmp_path / "b", name="runner-b", prices=PRICES) as b, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        gw.wait_providers(2)
        state0 = np.linspace(-1, 1, 16)
        fut = client.refereed(walk, state0, 100, checkpoint_every=10, budget=5,
                              providers=[honest, "runner-b"])
        final = fut.result(timeout=60)
        assert np.array_equal(final, run_locally(state0, 100))
        assert fut.verification["agreed"] is True and fut.verification["referee"] is None
        assert b.runs == 1 and b.ran == list(range(100))
        assert verify_receipt(fut.receipt, client.gateway_key)
        assert earnings(gw, b.account) > 0
    books_settle(gw.home.parent / "ledger.sqlite")


def test_a_provider_that_skips_step_37_is_caught_and_unpaid(net: tuple[Gateway, Path, str],
                                                            tmp_path: Path) -> None:
    gw, _, honest = net
    with StepRunner(gw.url, tmp_path / "cheat", name="cheater", skip=37,
                    prices=PRICES) as cheater, \
            StepRunner(gw.url, tmp_path / "ref", name="referee", prices=PRICES) as ref, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        gw.wait_providers(3)
        state0 = np.linspace(-1, 1, 16)
        fut = client.refereed(walk, state0, 100, checkpoint_every=10, budget=5,
                              providers=[honest, "cheater"])
        final = fut.result(timeout=90)
        assert np.array_equal(final, run_locally(state0, 100))  # the honest run's state
        v = fut.verification
        assert v["agreed"] is False and v["disputed_steps"] == [30, 39], v
        assert v["checkpoint"] == 4 and v["loser"].startswith("cheater"), v
        assert ref.runs == 1 and ref.ran == list(range(30, 40))  # only the disputed segment
        assert cheater.ran == list(range(100))
        assert verify_receipt(fut.receipt, client.gateway_key)
        assert earnings(gw, cheater.account) == 0
        assert earnings(gw, ref.account) > 0
        wait_for(lambda: {p.name: p.reputation for p in client.providers()}["cheater"]
                 < {p.name: p.reputation for p in client.providers()}["referee"], 10,
                 message="the cheater's reputation below the referee's")
        rep = {p.name: p.reputation for p in client.providers()}
        assert rep["cheater"] == min(rep.values()), rep
    books_settle(gw.home.parent / "ledger.sqlite")


def test_hostile_refereed_specs_are_refused(net: tuple[Gateway, Path, str],
                                            tmp_path: Path) -> None:
    from dataclasses import replace

    gw, _, _ = net
    with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        with pytest.raises(ValueError):
            client.refereed(walk, np.zeros(2), 0)
        with pytest.raises(ValueError):
            client.refereed(walk, np.zeros(2), 10, checkpoint_every=11)
        with pytest.raises(TypeError):
            client.refereed(walk, np.zeros(2), 10, redundancy=3)
        # a client that lies about its segment (the gateway checks the payload it relays)
        original = client._submit_frame

        def lying(specs, payloads, funcs):  # type: ignore[no-untyped-def]
            specs = [replace(s, refereed={"steps": 20, "every": 5}) for s in specs]
            return original(specs, payloads, funcs)

        client._submit_frame = lying  # type: ignore[method-assign]
        fut = client.refereed(walk, np.zeros(2), 10, checkpoint_every=5)
        with pytest.raises(Exception, match="segment"):
            fut.result(timeout=30)


def test_a_run_without_a_valid_commitment_loses_outright(net: tuple[Gateway, Path, str],
                                                         tmp_path: Path) -> None:
    """A provider that answers with something other than a commitment, and claims a verdict of
    its own in the result: no referee is needed, it is unpaid, and its claim never reaches the
    client (the verdict is the gateway's)."""
    gw, _, honest = net
    forged = {"kind": "refereed", "agreed": True, "winner": "me"}
    with StepRunner(gw.url, tmp_path / "junk", name="junk", garbage=True, forge=forged,
                    prices=PRICES) as junk, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        gw.wait_providers(2)
        state0 = np.linspace(0, 1, 8)
        fut = client.refereed(walk, state0, 20, checkpoint_every=5, budget=5,
                              providers=[honest, "junk"])
        assert np.array_equal(fut.result(timeout=60), run_locally(state0, 20))
        v = fut.verification
        assert v["agreed"] is False and v["referee"] is None and v["loser"].startswith("junk")
        assert "winner" in v and v["winner"] != "me"
        assert earnings(gw, junk.account) == 0
    books_settle(gw.home.parent / "ledger.sqlite")
