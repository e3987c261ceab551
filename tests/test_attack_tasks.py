"""Issue 9, acceptance 9: tasks that misbehave on purpose cannot take their provider down.

A real gateway, one real provider process and a real client. Each task here attacks what the
provider reads from it: floods of output (one 2 MB line, 200,000 tiny ones) and its worker
channel (junk, a lying length prefix, a malformed frame, a forged answer, a flood of frames, a
closed socket). Each attack may fail its own task, with a clear error; afterwards the same
provider process, on the same connection, serves the next task.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, ProviderProcess, start_gateway, start_provider, stop_process
from helpers import wait_for

from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LIMIT = 1024 * 1024  # the provider's default output kept per task
MARKER = re.compile(r"\[decompute: output truncated, (\d+) bytes dropped\]\n$")


# --------------------------------------------------------------------------- tasks


def add(x, y):
    return x + y


def one_huge_line():
    print("x" * 2_000_000)
    return 7


def many_lines(n):
    for i in range(n):
        print(i)
    return n


def channel_fd() -> int:
    return int(sys.argv[1])  # the worker is ``python -m provider.worker FD``


def write_junk():
    import os
    import time

    os.write(channel_fd(), b"junk" * 1000)
    time.sleep(30)  # killed long before


def lying_prefix():
    import os
    import struct
    import time

    os.write(channel_fd(), struct.pack("!Q", 2**62))
    time.sleep(30)


def malformed_frame():
    import os
    import struct
    import time

    os.write(channel_fd(), struct.pack("!Q", 64) + b"\0" * 64)
    time.sleep(30)


def forged_answer():
    import os
    import struct
    import time

    from gateway.protocol import encode_frame

    frame = encode_frame({"t": "fail", "key": "someone-else", "error": {
        "type": "X" * 5000, "module": "m", "message": "m" * 2_000_000, "traceback": ""}})
    os.write(channel_fd(), struct.pack("!Q", len(frame)) + frame)
    time.sleep(30)


def frame_flood():
    import os
    import socket
    import struct

    from gateway.protocol import encode_frame

    sock = socket.socket(fileno=os.dup(channel_fd()))
    chunk = encode_frame({"t": "out", "stream": "stdout", "text": "y" * 1_000_000})
    for _ in range(40):
        sock.sendall(struct.pack("!Q", len(chunk)) + chunk)
    return 5


def _send_with_fd(fd: int, size: int) -> None:
    """A ``done`` frame whose one big buffer is the descriptor ``fd`` (as workers send them)."""
    import os
    import socket
    import struct
    import time

    from gateway.protocol import encode_frame
    from provider.shared_memory import rights

    sock = socket.socket(fileno=os.dup(channel_fd()))
    frame = encode_frame({"t": "done", "key": "?", "dropped": 0, "fds": [[1, size]]},
                         [b"stream", b""])
    sock.sendmsg([struct.pack("!Q", len(frame))], rights([fd]))
    sock.sendall(frame)
    time.sleep(30)


def unsealed_result():
    import os

    fd = os.memfd_create("evil")  # writable and shrinkable after the provider maps it
    os.ftruncate(fd, 4 * 2**20)
    _send_with_fd(fd, 4 * 2**20)


def lying_result_size():
    import fcntl
    import os

    fd = os.memfd_create("evil", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2**20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_WRITE)
    _send_with_fd(fd, 64 * 2**20)  # it says 64 MiB: reading past 1 MiB would fault


def close_channel():
    import os

    os.close(channel_fd())
    return 1


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, ProviderProcess,
                                                                        Client]]:
    tmp = tmp_path_factory.mktemp("attack-tasks")
    gw = start_gateway(tmp)
    prov = start_provider(gw, tmp, "target", cpus=1)
    try:
        gw.wait_providers(1)
        with Client(gw.url, home=tmp / "client", stream_output=False) as client:
            yield gw, prov, client
    finally:
        stop_process(prov.proc)
        gw.stop()


def connections(log: Path) -> int:
    return log.read_text(errors="replace").count(" connected to ")


def still_serving(prov: ProviderProcess, client: Client) -> None:
    """The same provider process, on its first connection, runs the next task."""
    assert client.submit(add, 1, 2).result(timeout=60) == 3
    assert prov.proc.poll() is None, "the provider process died"
    assert connections(prov.log) == 1, f"the provider reconnected:\n{prov.log.read_text()[-3000:]}"


def stdout_of(fut) -> str:
    return "".join(text for stream, text in fut.output if stream == "stdout")


# --------------------------------------------------------------------------- output floods


def test_one_huge_line_arrives_truncated_and_marked(network) -> None:
    _, prov, client = network
    fut = client.submit(one_huge_line)
    assert fut.result(timeout=60) == 7
    text = wait_for(lambda: MARKER.search(stdout_of(fut)) and stdout_of(fut), 10,
                    message="the truncation line")
    kept = text[:MARKER.search(text).start()]
    assert kept == "x" * LIMIT
    assert int(MARKER.search(text).group(1)) == 2_000_001 - LIMIT
    assert len(MARKER.findall(text)) == 1
    still_serving(prov, client)


def test_200000_quick_prints_arrive_in_order_never_repeated(network) -> None:
    _, prov, client = network
    n = 200_000
    fut = client.submit(many_lines, n)
    assert fut.result(timeout=120) == n
    text = wait_for(lambda: MARKER.search(stdout_of(fut)) and stdout_of(fut), 10,
                    message="the truncation line")
    kept = text[:MARKER.search(text).start()]
    total = sum(len(str(i)) + 1 for i in range(n))
    assert len(kept.encode()) == LIMIT
    assert int(MARKER.search(text).group(1)) == total - LIMIT
    *lines, partial = kept.split("\n")
    assert lines == [str(i) for i in range(len(lines))]  # in order, none repeated or lost
    assert str(len(lines)).startswith(partial)
    still_serving(prov, client)


# --------------------------------------------------------------------------- channel attacks


@pytest.mark.parametrize(("task", "error"), [
    (write_junk, r"announced a \d+-byte message"),
    (lying_prefix, r"announced a 4611686018427387904-byte message"),
    (malformed_frame, r"malformed message"),
    (forged_answer, r"answered for another task"),
    (close_channel, r"closed its channel|channel to the provider closed"),
    (unsealed_result, r"not sealed against writes and shrinking"),
    (lying_result_size, r"where 67108864 were announced"),
], ids=["junk", "lying-prefix", "malformed-frame", "forged-answer", "closed", "unsealed-fd",
        "lying-fd-size"])
def test_a_broken_channel_fails_that_task_alone(network, task, error) -> None:
    _, prov, client = network
    fut = client.submit(task, retries=0)
    with pytest.raises(Exception, match=error) as info:
        fut.result(timeout=60)
    assert "WorkerDied" in f"{type(info.value).__name__} {info.value}"
    still_serving(prov, client)


def test_a_flood_of_forged_output_frames_is_capped(network) -> None:
    _, prov, client = network
    fut = client.submit(frame_flood)
    assert fut.result(timeout=60) == 5
    text = wait_for(lambda: MARKER.search(stdout_of(fut)) and stdout_of(fut), 10,
                    message="the truncation line")
    assert text[:MARKER.search(text).start()] == "y" * LIMIT
    assert int(MARKER.search(text).group(1)) == 40 * 1_000_000 - LIMIT
    still_serving(prov, client)


# --------------------------------------------------------------------------- what it returns


def big_bytes(n):
    return b"r" * n


def test_a_result_too_big_for_the_gateway_fails_that_task_alone(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, extra=("--max-message-mib", "4"))
    prov = start_provider(gw, tmp_path, "small-messages", cpus=1)
    try:
        gw.wait_providers(1)
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            with pytest.raises(ValueError, match="the gateway accepts messages of at most"):
                client.submit(big_bytes, 7 * 2**20, retries=0).result(timeout=60)
            assert client.submit(big_bytes, 2**20).result(timeout=60) == b"r" * 2**20
            still_serving(prov, client)
    finally:
        stop_process(prov.proc)
        gw.stop()


def test_a_key_too_long_for_any_message_leaves_the_provider_connected(network) -> None:
    _, prov, client = network
    with pytest.raises(Exception, match="too long"):
        client.submit(add, 1, 2, key="k" * 256).result(timeout=60)
    still_serving(prov, client)
