"""Issue 9, acceptance 7 and the lease and load interfaces, from the provider's side.

A real provider process connects to :class:`fake_gateway.FakeGateway`, which sends what a real
gateway never should: assignments for functions never sent, over the provider's resources, with
payloads that do not unpickle, keys too long for any message, fields of the wrong type, and plain
junk. The provider answers each task it can name with an error result, tells the gateway about
the rest with an ``Error``, and stays on its first connection. Heartbeats list every task held
(queued ones with ``{}``), cancels are answered for every key, and ``load`` measures the provider's
own task processes.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import _SEEN, ProviderProcess, stop_process
from fake_gateway import FakeGateway, payload, task_frame
from helpers import spawn, wait_for

from gateway import protocol as p

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ACCOUNT = "ab" * 32


def add(x, y):
    return x + y


def spin(seconds):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def function(fn) -> tuple[str, bytes]:
    blob = cloudpickle.dumps(fn, protocol=5)
    return hashlib.blake2b(blob, digest_size=16).hexdigest(), blob


def assignment(key: str, func: str, **fields) -> p.Assignment:
    return p.Assignment(key=key, func=func, nb=fields.pop("nb", 1), account=ACCOUNT, **fields)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeGateway,
                                                                     ProviderProcess]]:
    import psutil

    tmp = tmp_path_factory.mktemp("provider-assignments")
    gw = FakeGateway().start()
    home = tmp / "provider-home"
    home.mkdir()
    log = tmp / "provider.log"
    proc = spawn([sys.executable, "-m", "provider", gw.url, "--name", "target", "--cpus", "1",
                  "--memory", "1GiB"], home, log, Path(__file__).resolve().parents[1])
    _SEEN.append(psutil.Process(proc.pid))
    prov = ProviderProcess(proc, "target", log)
    try:
        wait_for(lambda: gw.connections == 1, 60, message="the provider connected")
        yield gw, prov
    finally:
        stop_process(proc)
        gw.stop()


def result_of(gw: FakeGateway, key: str, timeout: float = 30.0) -> p.Result:
    return wait_for(lambda: gw.results().get(key), timeout, message=f"a result for {key}")


def still_connected(gw: FakeGateway, prov: ProviderProcess) -> None:
    func, blob = function(add)
    gw.send(task_frame([assignment("after", func)], {func: blob}, [payload(2, 3)]))
    assert result_of(gw, "after").status == "finished"
    assert prov.proc.poll() is None
    assert gw.connections == 1, prov.log.read_text()[-3000:]
    gw.messages.clear()


def test_assignments_it_cannot_run_are_refused_with_a_result(fake) -> None:
    gw, prov = fake
    func, blob = function(add)
    gw.send(task_frame([assignment("no-func", "0" * 32)], {}, [payload(1, 2)]))
    gw.send(task_frame([assignment("too-big", func, resources={"memory": 2**40})],
                       {func: blob}, [payload(1, 2)]))
    gw.send(task_frame([assignment("bad-payload", func)], {func: blob}, [[b"not a pickle"]]))
    assert "never sent" in result_of(gw, "no-func").error.message
    too_big = result_of(gw, "too-big")
    assert too_big.status == "error" and too_big.code == "limit"
    assert "memory" in too_big.error.message
    bad = result_of(gw, "bad-payload")
    assert bad.status == "error" and bad.error.type == "UnpicklingError"
    still_connected(gw, prov)


def test_an_unreadable_assign_runs_what_is_sound_and_refuses_the_rest(fake) -> None:
    gw, prov = fake
    func, blob = function(add)
    specs = [assignment("sound", func), assignment("k" * 300, func),
             assignment("bad-field", func, timeout="soon")]
    gw.send(task_frame(specs, {func: blob}, [payload(1, 1), payload(2, 2), payload(3, 3)]))
    assert result_of(gw, "sound").status == "finished"
    refused = result_of(gw, "bad-field")
    assert refused.status == "error" and "timeout" in refused.error.message
    error = wait_for(lambda: gw.of_type(p.Error), 10, message="an Error for the gateway")[0]
    assert "1 tasks in it have no usable key" in error.message
    assert "k" * 300 not in gw.results()
    gw.send(b"this is not a frame")
    wait_for(lambda: len(gw.of_type(p.Error)) == 2, 10, message="an Error for the junk frame")
    still_connected(gw, prov)


def test_heartbeats_hold_every_task_cancels_answer_every_key(fake) -> None:
    gw, prov = fake
    spin_func, spin_blob = function(spin)
    add_func, add_blob = function(add)
    gw.send(task_frame([assignment("spinning", spin_func), assignment("queued", add_func)],
                       {spin_func: spin_blob, add_func: add_blob}, [payload(60), payload(1, 2)]))

    def both_held(h: p.Heartbeat) -> bool:
        return (h.usage.get("queued") == {} and h.usage.get("spinning", {}).get("cpu_seconds", 0)
                > 0.2 and h.load.get("cpu", 0) > 0.05)  # a share of a loaded 2-core machine

    beat = wait_for(lambda: gw.heartbeat_where(both_held), 30, message="a heartbeat holding both")
    assert set(beat.load) == {"cpu", "memory_bytes", "running", "store_bytes", "store_limit"}
    assert beat.load["running"] == 1 and 0 < beat.load["memory_bytes"] < 2**31
    assert beat.load["cpu"] <= 1.0

    gw.send(p.encode(p.Cancel(keys=["queued", "never-heard-of"])))
    assert result_of(gw, "queued").status == "cancelled"
    assert result_of(gw, "never-heard-of").status == "cancelled"
    assert gw.results()["queued"].usage == {}
    gw.send(p.encode(p.Cancel(keys=["spinning"])))
    cancelled = result_of(gw, "spinning")
    assert cancelled.status == "cancelled" and cancelled.usage["cpu_seconds"] > 0.2
    wait_for(lambda: gw.heartbeat_where(lambda h: not h.usage and h.load["running"] == 0), 10,
             message="a heartbeat holding nothing")
    still_connected(gw, prov)


def flood(seconds):
    import os
    import socket
    import struct
    import sys
    import time

    from gateway.protocol import encode_frame

    sock = socket.socket(fileno=os.dup(int(sys.argv[1])))
    chunk = encode_frame({"t": "out", "stream": "stdout", "text": "f" * 64})
    frame = (struct.pack("!Q", len(chunk)) + chunk) * 10_000  # tiny frames: costly to read
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.sendall(frame)
    return seconds


def test_a_task_flooding_its_channel_does_not_starve_the_heartbeats(fake) -> None:
    gw, prov = fake
    func, blob = function(flood)
    before = len(gw.of_type(p.Heartbeat))
    gw.send(task_frame([assignment("flood", func)], {func: blob}, [payload(5)]))
    assert result_of(gw, "flood", timeout=60).status == "finished"
    # 0.5 s apart over the 5 s flood, with room for a loaded machine (starved: 0 or 1)
    assert len(gw.of_type(p.Heartbeat)) - before >= 4
    still_connected(gw, prov)
