"""Acceptance 6 of issue 2, and what else a lost peer means for a user.

A provider killed with SIGKILL mid-task: the task finishes on the other provider, or, past its
``retries``, fails with ``ProviderLost``. A client whose connection drops reconnects with the same
session and still gets the result that finished while it was away.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import (
    Gateway,
    ProviderProcess,
    gone,
    kill_tree,
    start_gateway,
    start_provider,
    wait_for,
)

from notebook_ext import Client, ProviderLost

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_square(x, seconds):
    print(os.getpid(), flush=True)
    time.sleep(seconds)
    return x * x


def add(x, y):
    return x + y


@dataclass
class Network:
    gateway: Gateway
    providers: dict[str, ProviderProcess]
    client: Client

    def running_on(self, fut) -> ProviderProcess:
        """The provider process running ``fut`` (provider ids are ``<name>-<hex>``)."""
        wait_for(lambda: fut.status == "running" and fut.provider, 30, message="task running")
        return self.providers[fut.provider.rsplit("-", 1)[0]]

    def task_process(self, fut) -> psutil.Process:
        text = wait_for(lambda: "".join(t for s, t in fut.output if s == "stdout"), 15,
                        message="the task printed its pid")
        return psutil.Process(int(text.split()[0]))


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A gateway and two separate provider processes, ``alpha`` and ``beta``, one slot each."""
    gw = start_gateway(tmp_path / "gw")
    providers = {name: start_provider(gw, tmp_path, name) for name in ("alpha", "beta")}
    seen: list[psutil.Process] = []
    try:
        gw.wait_providers(2)
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            yield Network(gw, providers, client)
            for prov in providers.values():
                seen += prov.workers()
    finally:
        for prov in providers.values():
            prov.stop()
        gw.stop()
        kill_tree([p for p in seen if not gone(p)])


def test_sigkilled_provider_task_completes_on_the_other(network: Network) -> None:
    fut = network.client.submit(slow_square, 7, 2.0)
    victim = network.running_on(fut)
    first = fut.provider
    first_process = network.task_process(fut)
    survivor = next(p for p in network.providers.values() if p is not victim)

    workers = victim.sigkill()
    kill_tree(workers)  # its task processes lead their own process groups

    assert fut.result(60) == 49
    assert fut.status == "finished"
    assert fut.provider != first
    assert fut.provider.startswith(survivor.name)
    assert gone(first_process)
    assert network.gateway.health()["provider_names"] == [survivor.name]
    assert network.client.submit(add, 1, 2).result(30) == 3


def test_retries_zero_fails_with_provider_lost(network: Network) -> None:
    fut = network.client.submit(slow_square, 3, 30, retries=0)
    victim = network.running_on(fut)
    kill_tree(victim.sigkill())
    with pytest.raises(ProviderLost, match="lost") as info:
        fut.result(30)
    assert "retries=0" in str(info.value)
    assert fut.status == "error"
    # the other provider is fine and keeps serving
    assert network.client.submit(add, 2, 2).result(30) == 4


def test_lost_more_often_than_retries_allows_fails_with_provider_lost(network: Network) -> None:
    fut = network.client.submit(slow_square, 3, 30, retries=1)
    first = network.running_on(fut)
    first_id = fut.provider
    kill_tree(first.sigkill())
    wait_for(lambda: fut.provider not in (None, first_id), 30, message="retried elsewhere")
    second = network.running_on(fut)
    assert second is not first
    kill_tree(second.sigkill())
    with pytest.raises(ProviderLost, match="2 times"):
        fut.result(30)


def test_idle_task_processes_of_a_killed_provider_exit(network: Network) -> None:
    # a task of this client first, so every worker is started and bound
    assert network.client.gather(network.client.map(add, range(4), range(4))) == [0, 2, 4, 6]
    victim = network.providers["alpha"]
    workers = victim.workers()
    assert workers
    victim.sigkill()
    try:
        wait_for(lambda: all(gone(w) for w in workers), 5, message="idle workers exit")
    finally:
        kill_tree(workers)


def test_busy_task_process_of_a_killed_provider_exits(network: Network) -> None:
    fut = network.client.submit(slow_square, 3, 60, retries=0)
    victim = network.running_on(fut)
    task = network.task_process(fut)
    victim.sigkill()
    try:
        wait_for(lambda: gone(task), 3, message="the orphaned task process exit")
    finally:
        kill_tree([task])


# --------------------------------------------------------------------------- client reconnect


class TcpProxy:
    """A loopback TCP relay in front of the gateway that the test can cut and block.

    It moves bytes only (no websocket or decompute logic), so the Client and gateway see a real
    network outage: their connection drops, and reconnect attempts fail while blocked.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blocked = threading.Event()
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                if self.blocked.is_set():
                    conn.close()
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    conn.close()
                    continue
                upstream.settimeout(None)
                with self.lock:
                    self.sockets |= {conn, upstream}
                    self.accepted += 1
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every relayed connection at once, as a network outage would."""
        with self.lock:
            socks, self.sockets = self.sockets, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(gateway: Gateway) -> Iterator[TcpProxy]:
    relay = TcpProxy(gateway.port)
    yield relay
    relay.close()


def test_client_reconnects_and_gets_results_that_finished_meanwhile(
        gateway: Gateway, proxy: TcpProxy, client_home: Path) -> None:
    with Client(f"ws://127.0.0.1:{proxy.port}", home=client_home, stream_output=False,
                queue_while_disconnected=True) as c:
        fut = c.submit(slow_square, 6, 0.5)
        wait_for(lambda: fut.status == "running", 15, message="task running")
        proxy.blocked.set()
        proxy.cut()
        # the task finishes while the client is away; the gateway keeps its result
        wait_for(lambda: gateway.health()["tasks"]["running"] == 0, 15, message="task finished")
        assert not fut.done()
        queued = c.submit(add, 40, 2)  # submitted while disconnected: sent after the reconnect
        proxy.blocked.clear()
        assert fut.result(30) == 36
        assert queued.result(30) == 42
        assert proxy.accepted >= 2


def test_client_reconnects_after_a_dropped_connection(gateway: Gateway, proxy: TcpProxy,
                                                      client_home: Path) -> None:
    """Nothing finishes while it is away: after the drop the same Client simply keeps working."""
    with Client(f"ws://127.0.0.1:{proxy.port}", home=client_home, stream_output=False) as c:
        assert c.submit(add, 1, 1).result(30) == 2
        proxy.cut()
        wait_for(lambda: proxy.accepted >= 2 and c.status == "connected", 15,
                 message="the client reconnected")
        assert c.submit(add, 2, 2).result(30) == 4
        fut = c.submit(slow_square, 5, 1.0)
        wait_for(lambda: fut.status == "running", 15, message="task running")
        proxy.cut()  # dropped mid-task, reconnects at once, before the result exists
        assert fut.result(30) == 25
