"""Attacks on blob transfers: fake providers and clients that speak the wire protocol.

Who may send a chunk (the transfer's source only), of which blob (the one asked for), in which
order (the next offset), within which bounds (the blob's size); whose blob a task may name (its
own account's); what a provider is paid for (result bytes that reached the client and match the
hash it named). Each attack fails at most the attacker's own transfer, with a clear error.
"""

from __future__ import annotations

import hashlib
import queue
import secrets
from dataclasses import replace
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from conftest import start_gateway
from fakes import FakeClient, FakeProvider
from helpers import wait_for

from gateway import protocol as p
from gateway.blob_messages import BLOB_MIN
from notebook_ext import Client
from notebook_ext.errors import ProviderLost
from notebook_ext.serialize import dumps_args, dumps_function, local_runtime

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory):
    """A gateway without providers: the fakes are the only ones."""
    gw = start_gateway(tmp_path_factory.mktemp("blobs"))
    yield gw
    gw.stop()


def next_of(q: queue.Queue, kind: type, timeout: float = 20.0):
    """The next message of ``kind`` from a fake's queue (others are skipped)."""
    return wait_for(lambda: _take(q, kind), timeout, interval=0.01,
                    message=f"a {kind.__name__} message")


def _take(q: queue.Queue, kind: type):
    while True:
        try:
            msg = q.get_nowait()
        except queue.Empty:
            return None
        if isinstance(msg, kind):
            return msg


def blob_task(key: str, size: int, retries: int = 0) -> tuple[p.TaskSpec, dict, list]:
    """A task ``np.sum(array)`` whose array (``size`` bytes) travels as blob position 1."""
    fn_hash, fn_blob = dumps_function(np.sum)
    stream, _ = dumps_args((np.zeros(size // 8),), {})
    spec = p.TaskSpec(key=key, func=fn_hash, nb=1, runtime=local_runtime(), retries=retries,
                      refs=[[1, "t" + secrets.token_hex(16), size]])
    return spec, {fn_hash: fn_blob}, [[stream]]


def test_chunks_from_anyone_but_the_source_are_dropped(lone, tmp_path: Path) -> None:
    """A provider and another client inject chunks into a client's transfer: both are dropped,
    the real bytes arrive, and the task runs on them."""
    with FakeProvider(lone.url, tmp_path / "prov") as prov, \
            FakeClient(lone.url, tmp_path / "owner") as owner, \
            FakeClient(lone.url, tmp_path / "intruder") as intruder:
        size = BLOB_MIN
        spec, funcs, payloads = blob_task("victim", size)
        owner.submit([spec], funcs, payloads)
        want = next_of(owner.other, p.Want)
        bid = spec.refs[0][1]
        junk = b"\xff" * (1024 * 1024)
        for who in (prov, intruder):  # before the owner's first chunk: at offset 0
            who.send(p.Chunk(x=want.x, blob=bid, size=size, offset=0), [junk])
        good = bytes(range(256)) * (size // 256)
        for off in range(0, size, MiB):
            owner.send(p.Chunk(x=want.x, blob=bid, size=size, offset=off), [good[off:off + MiB]])
        assignment, _ = prov.next_assignment()
        assert assignment.refs == spec.refs
        got = bytearray()
        while len(got) < size:
            chunk, data = prov.chunks.get(timeout=20)
            assert chunk.x == want.x and chunk.offset == len(got)
            got += data
        assert bytes(got) == good  # the owner's bytes, and only them


def test_a_chunk_out_of_order_or_past_the_end_stops_the_transfer(lone, tmp_path: Path) -> None:
    with FakeProvider(lone.url, tmp_path / "prov") as prov, \
            FakeClient(lone.url, tmp_path / "liar") as liar:
        size = BLOB_MIN
        spec, funcs, payloads = blob_task("skips", size)
        liar.submit([spec], funcs, payloads)
        want = next_of(liar.other, p.Want)
        liar.send(p.Chunk(x=want.x, blob=spec.refs[0][1], size=size, offset=MiB), [b"x" * MiB])
        result = liar.wait_results(1, 20)[0]
        assert result.status == "error" and "out of order" in result.error.message, result
        prov.next_assignment()
        assert next_of(prov.other, p.Abort).x == want.x  # the provider drops what it had


def test_a_blob_id_names_one_size(lone, tmp_path: Path) -> None:
    with FakeClient(lone.url, tmp_path / "c") as client:
        spec, funcs, payloads = blob_task("first", BLOB_MIN)
        again = replace(spec, key="second", refs=[[1, spec.refs[0][1], 2 * BLOB_MIN]])
        client.submit([spec, again], funcs, payloads * 2)
        refused = client.wait_results(1, 20)[0]
        assert refused.key == "second" and "a blob id names one content" in refused.error.message
        client.send(p.Cancel(keys=["first"]))  # it waits for a provider; its escrow comes back
        assert client.wait_results(1, 20)[0].status == "cancelled"


def test_a_scatter_cannot_reach_another_accounts_data(lone, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Bob names the hash of Alice's scattered array: the gateway asks *Bob* for the bytes
    (ids are scoped by account), never copies Alice's to him."""
    with FakeProvider(lone.url, tmp_path / "prov") as prov:
        monkeypatch.setenv("DECOMPUTE_HOME", str(tmp_path / "alice"))
        with Client(lone.url) as alice:
            secret = alice.scatter(np.arange(1000.0))
            chunk, _ = prov.chunks.get(timeout=20)  # Alice's bytes reach the provider
            assert chunk.blob == secret.key
            wait_for(lambda: secret.done(), 20)
            with FakeClient(lone.url, tmp_path / "bob") as bob:
                bob.send(p.Scatter(blobs=[[secret.key, secret.nbytes]]))
                asked = next_of(bob.other, p.Want)
                assert asked.blob == secret.key  # Bob must send them himself
                bob.send(p.Abort(x=asked.x, reason="I do not have them"))
                stored = next_of(bob.other, p.Stored)
                assert stored.errors[0] and "do not have them" in stored.errors[0]


def test_a_provider_whose_result_bytes_do_not_match_their_hash_is_refused(
        lone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cheat = FakeProvider(lone.url, tmp_path / "cheat", name="cheat")
    cheat.ad = replace(cheat.ad, packages={"numpy": np.__version__})  # it can take np.ones
    with cheat:
        monkeypatch.setenv("DECOMPUTE_HOME", str(tmp_path / "client"))
        with Client(lone.url) as client:
            fut = client.submit(np.ones, BLOB_MIN // 8, retries=0)
            assignment, _ = cheat.next_assignment()
            assert assignment.blobs
            honest = np.ones(BLOB_MIN // 8)
            stream = cloudpickle.dumps(honest, protocol=5, buffer_callback=lambda b: None)
            claimed = "s" + hashlib.sha256(honest.tobytes()).hexdigest()
            cheat.send(p.Results(results=[p.Result(
                key=assignment.key, status="finished", nb=1, usage={"cpu_seconds": 1.0},
                refs=[[1, claimed, BLOB_MIN]])]), [stream])
            want = next_of(cheat.other, p.Want)
            assert want.blob == claimed and want.owner == assignment.account
            for off in range(0, BLOB_MIN, MiB):  # zeros, not the ones it named
                cheat.send(p.Chunk(x=want.x, blob=claimed, size=BLOB_MIN, offset=off),
                           [b"\0" * MiB])
            with pytest.raises(ProviderLost, match="do not match"):
                fut.result(30)
            info = {i.name: i for i in client.providers()}["cheat"]
            assert info.reputation < 0.5
