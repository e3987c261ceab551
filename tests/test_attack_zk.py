"""Issue 14, acceptance 4: ``decompute[zk]``, proof-carrying results.

A valid proof is accepted and paid; a tampered output, a tampered proof, a proof of another
input, or no envelope at all is refused by the gateway (the escrow goes back, the provider is not
paid and its reputation drops) and by the client. Provers are :class:`zk_cheats.ZkProver` fakes
that really prove (ezkl, in this process) and then lie as told, against a real gateway process and
its SQLite ledger; one test uses a real sandboxed provider. After every test the books are
conserved with no escrow left held (conftest's ``attack_books``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

pytest.importorskip("ezkl", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")
pytest.importorskip("onnx", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")

from conftest import REPO, Gateway, start_gateway  # noqa: E402
from helpers import spawn, wait_for  # noqa: E402
from zk_cheats import TAMPER, ZkProver, tiny_model  # noqa: E402

from gateway.billing import result_hash  # noqa: E402
from gateway.ledger import Ledger, to_micro  # noqa: E402
from notebook_ext import (  # noqa: E402
    BudgetExceeded,
    Client,
    NoMatchingProvider,
    VerificationFailed,
    verify_receipt,
)
from notebook_ext.futures import RawResult  # noqa: E402
from notebook_ext.zk import ProofFuture, ProofInvalid, ZkModel, compile_model  # noqa: E402

BUDGET = 5.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("attack-zk"))
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[ZkModel, object, bytes]:
    onnx_bytes, sample = tiny_model()
    zk = compile_model(onnx_bytes, sample, cache=tmp_path_factory.mktemp("zk-cache"))
    print(f"\ncompiled {zk}: {zk.seconds}")
    return zk, sample, onnx_bytes


def balance(gw: Gateway, account: str) -> int:
    with Ledger(gw.home.parent / "ledger.sqlite") as led:
        return led.balance(account)


def expected(onnx_bytes: bytes, x) -> list[float]:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    w, b = (numpy_helper.to_array(t) for t in graph.initializer)
    return list(np.asarray(x) @ w + b)


def test_a_valid_proof_is_accepted_and_paid(gw: Gateway, model, tmp_path: Path) -> None:
    zk, x, onnx_bytes = model
    with ZkProver(gw.url, tmp_path / "honest", name="honest") as prover, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        client_before, prover_before = balance(gw, client.account), balance(gw, prover.account)
        fut = client.prove(zk, x, budget=BUDGET, providers=["honest"], retries=0)
        out = fut.result(60)
        assert out.shape == tuple(zk.output_shape)
        assert max(abs(a - b) for a, b in zip(out.ravel(), expected(onnx_bytes, x),
                                               strict=True)) < 0.05
        check = fut.verification
        assert check["kind"] == "proof" and check["verified"] is True
        assert check["model"] == zk.model and check["vk_hash"] == zk.vk_hash
        assert fut.cost > 0 and fut.receipt is not None
        # the receipt's result hash covers the envelope, which names the model and the vk
        assert verify_receipt(fut.receipt, client.gateway_key)
        leaf = json.loads(fut.receipt["entry"])
        assert leaf["outcome"] == result_hash(fut.raw_buffers())
        envelope = msgpack.unpackb(fut.proof)
        assert (envelope["model"], envelope["vk_hash"]) == (zk.model, zk.vk_hash)
        paid = fut.receipt["amount_micro"]
        assert paid == to_micro(fut.cost)
        wait_for(lambda: balance(gw, prover.account) - prover_before == paid, 10,
                 message="the prover paid")
        assert client_before - balance(gw, client.account) == paid


@pytest.mark.parametrize("tamper", ["output", "proof", "input", "garbage"])
def test_a_tampered_proof_is_refused_and_unpaid(gw: Gateway, model, tmp_path: Path,
                                                tamper: str) -> None:
    zk, x, _ = model
    name = f"cheat-{tamper}"
    with ZkProver(gw.url, tmp_path / name, name=name, tamper=tamper) as cheat, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        client_before, cheat_before = balance(gw, client.account), balance(gw, cheat.account)
        fut = client.prove(zk, x, budget=BUDGET, providers=[name], retries=0)
        with pytest.raises(VerificationFailed, match="refused by the gateway") as caught:
            fut.result(60)
        print(f"\n{tamper}: {caught.value}")
        assert fut.verification["verified"] is False and fut.verification["by"] == ["gateway"]
        assert cheat.served, "the cheater ran the task"
        assert fut.cost == 0 and fut.receipt is None
        wait_for(lambda: balance(gw, client.account) == client_before, 10,
                 message="the escrow back (the ledger commits after the answer)")
        assert balance(gw, cheat.account) == cheat_before  # not paid
        info = {pi.name: pi for pi in client.providers()}[name]
        assert info.reputation < 0.5


def test_no_proof_no_pay_an_error_or_a_spent_budget_is_not_paid(gw: Gateway, model,
                                                                tmp_path: Path) -> None:
    """A prover that fails, or that runs past its budget without a proof, earns nothing: the
    escrow goes back whole (heartbeats move no tokens on a proof task)."""
    zk, x, _ = model
    with ZkProver(gw.url, tmp_path / "idle", name="idle") as idle, \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        idle.close_serving()  # this test answers by hand
        client_before, idle_before = balance(gw, client.account), balance(gw, idle.account)
        failing = client.prove(zk, x, budget=BUDGET, providers=["idle"], retries=0)
        assignment, _ = idle.next_assignment()
        idle.fail(assignment.key, "out of memory", usage={"cpu_seconds": 0.2})
        with pytest.raises(Exception, match="out of memory"):
            failing.result(30)
        assert failing.cost == 0
        spending = client.prove(zk, x, budget=1.2, providers=["idle"], retries=0)
        assignment, _ = idle.next_assignment()
        deadline = time.monotonic() + 20
        while not spending.done() and time.monotonic() < deadline:  # beats, as provers do
            idle.heartbeat({assignment.key: {"cpu_seconds": 60.0}})  # capped by the wall time
            cf.wait([spending], timeout=0.25)
        with pytest.raises(BudgetExceeded, match="nothing was charged"):
            spending.result(5)
        assert idle.cancelled.get(timeout=10) == assignment.key
        idle.finish(assignment.key, buffers=[b"late", b"late"], usage={"cpu_seconds": 9.0})
        assert spending.cost == 0
        wait_for(lambda: balance(gw, client.account) == client_before, 10,
                 message="both escrows back (the ledger commits after the answer)")
        assert balance(gw, idle.account) == idle_before


def test_the_client_refuses_a_tampered_proof_itself(gw: Gateway, model, tmp_path: Path) -> None:
    """Even a gateway that let a bad proof through would not get it past the client."""
    zk, x, _ = model
    with ZkProver(gw.url, tmp_path / "honest2", name="honest2"), \
            Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
        good = client.prove(zk, x, budget=BUDGET, providers=["honest2"], retries=0)
        good.result(60)
        for tamper in ("output", "proof", "garbage"):
            forged = ProofFuture(client, f"forged-{tamper}")
            forged.zk_model, forged.proof_spec = zk, zk.spec(x)
            forged._finish(RawResult([memoryview(b"\x80\x05N."),
                                      memoryview(TAMPER[tamper](good.proof))]))
            with pytest.raises(ProofInvalid, match="refused by the client"):
                forged.result()
            assert forged.verification["verified"] is False
        other = ProofFuture(client, "other-input")  # a valid proof, of another input
        other.zk_model, other.proof_spec = zk, zk.spec([0.5] * len(zk.spec(x).inputs))
        other._finish(RawResult([memoryview(b""), memoryview(good.proof)]))
        with pytest.raises(ProofInvalid, match="public inputs"):
            other.result()


def test_a_real_sandboxed_provider_proves_and_is_paid(gw: Gateway, model, tmp_path: Path) -> None:
    zk, x, onnx_bytes = model
    home = tmp_path / "real-home"
    home.mkdir()
    proc = spawn([sys.executable, "-m", "provider", gw.url, "--name", "real-prover",
                  "--cpus", "1", "--price-cpu", "1"], home, tmp_path / "real.log", REPO)
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            wait_for(lambda: any(pi.name == "real-prover" for pi in client.providers()), 30,
                     message="the real provider online")
            fut = client.prove(zk, x, budget=BUDGET, providers=["real-prover"], retries=0)
            out = fut.result(120)
            assert max(abs(a - b) for a, b in zip(out.ravel(), expected(onnx_bytes, x),
                                                   strict=True)) < 0.05
            assert fut.verification["verified"] is True and fut.cost > 0
            assert verify_receipt(fut.receipt, client.gateway_key)
            print(f"\nreal provider: proved in {fut.usage.get('wall_seconds', 0):.2f} s, "
                  f"cost {fut.cost:.6f} tokens; client verify "
                  f"{fut.verification['verify_seconds']} s")
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_gateway_without_ezkl_refuses_proof_tasks_at_submit(
        model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zk, x, _ = model
    shim = tmp_path / "shim" / "ezkl"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('ezkl hidden for this test')\n")
    path = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    bare = start_gateway(tmp_path / "bare")
    monkeypatch.undo()
    try:
        with ZkProver(bare.url, tmp_path / "p", name="willing"), \
                Client(bare.url, home=tmp_path / "client", stream_output=False) as client:
            before = client.balance()
            fut = client.prove(zk, x, budget=BUDGET, retries=0)
            with pytest.raises(NoMatchingProvider, match="cannot verify proofs"):
                fut.result(30)
            assert client.balance() == before
    finally:
        bare.stop()


def test_compiling_again_loads_the_cache_by_model_hash(model, tmp_path: Path) -> None:
    _, x, onnx_bytes = model
    first = compile_model(onnx_bytes, x, cache=tmp_path)
    again = compile_model(onnx_bytes, x, cache=tmp_path)
    assert again.seconds == {} and again.path == first.path  # nothing rebuilt
    assert (again.vk_hash, again.srs, again.circuit) == (first.vk_hash, first.srs, first.circuit)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # no build left over
