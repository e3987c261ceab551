"""Issue 10, the volunteer's side: what running ``decompute-provider`` is like.

Real processes on loopback: a gateway, two providers and a client. A provider logs a line per
task (client account short id, duration, CPU-s, tokens); Ctrl-C (SIGINT) stops it gracefully:
the running task is handed back and completes on the other provider, the summary is printed and
the process exits 0; a second Ctrl-C kills at once. ``decompute-provider --status`` prints the
account's balance, lifetime earnings and tasks served, or says clearly that the gateway is down.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import (
    _SEEN,
    REPO,
    Gateway,
    ProviderProcess,
    start_gateway,
    start_provider,
)
from fake_gateway import FakeGateway, payload, task_frame
from helpers import free_port, gone, home_env, spawn, wait_for

from gateway import protocol as p
from notebook_ext import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(x, y):
    return x + y


def nap(seconds):
    """Long enough to be caught running (no gate: task processes have a private /tmp)."""
    import time

    time.sleep(seconds)
    return True


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("volunteer"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with Client(gateway.url, home=tmp_path_factory.mktemp("volunteer-client"),
                stream_output=False) as c:
        yield c


def name_of(provider_id: str) -> str:
    return provider_id.rsplit("-", 1)[0]


def status(url: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "provider", url, "--status"], cwd=REPO,
                          env=home_env(home), capture_output=True, text=True, timeout=60)


def test_ctrl_c_hands_the_running_task_back_and_prints_a_summary(
        gateway: Gateway, client: Client, tmp_path: Path) -> None:
    provs = {name: start_provider(gateway, tmp_path, name) for name in ("first", "second")}
    try:
        gateway.wait_providers(2)
        fut = client.submit(nap, 3, retries=2)
        wait_for(lambda: fut.status == "running" and fut.provider, 30, message="task running")
        stopped = provs[name_of(fut.provider)]
        other = provs[({"first", "second"} - {stopped.name}).pop()]
        stopped.proc.send_signal(signal.SIGINT)
        assert stopped.proc.wait(30) == 0
        log = stopped.log.read_text()
        assert "handing 1 tasks back to the gateway" in log
        assert re.search(rf"decompute-provider stopped\. provider {stopped.name}: 0 tasks served "
                         r"this session, [\d.]+ CPU-s, [\d.]+ tokens earned this session", log), log
        assert not stopped.workers()

        wait_for(lambda: fut.provider and name_of(fut.provider) == other.name, 30,
                 message="the task re-queued to the other provider")
        assert fut.result(timeout=60) is True
        line = rf"task \S+ for {client.account[:8]}: finished in [\d.]+ s, [\d.]+ CPU-s, " \
               r"[\d.]+ tokens at our prices"
        wait_for(lambda: re.search(line, other.log.read_text()), 10, message="a log line per task")

        other.proc.send_signal(signal.SIGINT)  # idle: stops at once, counting what it served
        assert other.proc.wait(30) == 0
        assert "1 tasks served this session" in other.log.read_text()
        shown = status(gateway.url, tmp_path / f"provider-{other.name}")
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"balance: +[\d.]+ tokens", shown.stdout), shown.stdout
        assert re.search(r"earned, lifetime: +[\d.]+ tokens", shown.stdout), shown.stdout
        assert re.search(r"tasks served: +1 \(", shown.stdout), shown.stdout
    finally:
        for prov in provs.values():
            prov.stop()


def test_status_says_clearly_when_the_gateway_is_unreachable(tmp_path: Path) -> None:
    shown = status(f"ws://127.0.0.1:{free_port()}", tmp_path)
    assert shown.returncode == 1
    assert "cannot reach the gateway" in shown.stderr and "DECOMPUTE_GATEWAY" in shown.stderr


def spin(seconds):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    """Against a gateway that never answers the last earnings question, the graceful stop waits;
    a second Ctrl-C during that wait kills the task and exits at once."""
    gw = FakeGateway().start()
    home = tmp_path / "home"
    home.mkdir()
    proc = spawn([sys.executable, "-m", "provider", gw.url, "--name", "impatient", "--cpus", "1"],
                 home, tmp_path / "provider.log", REPO)
    _SEEN.append(psutil.Process(proc.pid))  # checked dead at the session's end
    prov = ProviderProcess(proc, "impatient", tmp_path / "provider.log")
    try:
        wait_for(lambda: gw.connections == 1, 60, message="the provider connected")
        blob = cloudpickle.dumps(spin, protocol=5)
        gw.send(task_frame([p.Assignment(key="spin", func="f" * 32, nb=1, account="ab" * 32)],
                           {"f" * 32: blob}, [payload(60)]))
        wait_for(lambda: gw.heartbeat_where(
            lambda h: h.usage.get("spin", {}).get("cpu_seconds", 0) > 0.1), 30,
            message="the task spinning")
        workers = prov.workers()
        prov.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "handing 1 tasks back" in prov.log.read_text(), 10,
                 message="the graceful stop begun")
        prov.proc.send_signal(signal.SIGINT)
        assert prov.proc.wait(5) == 130
        wait_for(lambda: all(gone(w) for w in workers), 5, message="its task processes gone")
    finally:
        prov.stop()
        gw.stop()


def test_served_totals_add_up_across_providers_of_one_home(tmp_path: Path) -> None:
    """Two providers in one home add to one total; nothing is lost between them."""
    from provider import stats

    stats.add(tmp_path, 2, 1.5)
    stats.add(tmp_path, 3, 0.5)
    assert stats.load(tmp_path) == stats.Served(5, 2.0)
    assert stats.load(tmp_path / "nowhere") == stats.Served()



def burn(seconds):
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def test_load_shown_to_clients_is_the_providers_own_task_processes(
        gateway: Gateway, client: Client, tmp_path: Path) -> None:
    prov = start_provider(gateway, tmp_path, "measured")
    try:
        def mine() -> dict | None:
            found = [info for info in client.providers() if info.name == "measured"]
            return found[0].load if found and found[0].load else None

        idle = wait_for(mine, 60, message="the provider's first heartbeat")
        assert set(idle) == {"cpu", "memory_bytes", "running", "store_bytes", "store_limit"}
        online = [info for info in client.providers() if info.name == "measured"][0]
        fut = client.submit(burn, 6, providers=[online.id])
        busy = wait_for(lambda: (load := mine()) and load["running"] == 1 and load["cpu"] > 0.05
                        and load, 30, message="load while the task burns CPU")
        assert 0 < busy["memory_bytes"] < 2**31 and busy["cpu"] <= 1.0
        assert fut.result(timeout=60) == 6
        wait_for(lambda: (load := mine()) and load["running"] == 0 and load["cpu"] == 0, 10,
                 message="no load once the task ended")
    finally:
        prov.stop()
