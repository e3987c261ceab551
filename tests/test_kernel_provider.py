"""A provider run by a notebook kernel (issue 5, item 6): kernel A provides, kernel B uses it.

The network starts with no providers of its own, so the only provider kernel B can see is the
one kernel A starts; its tasks must run in sandboxed children of kernel A, never in kernel A.
"""

from __future__ import annotations

import psutil
import pytest
from kernel_fixtures import Kernel, Network, wait_for


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    network = Network(tmp_path_factory.mktemp("kp-net"), providers=0).start()
    yield network
    network.stop()


def new_kernel(net: Network, tmp_path_factory: pytest.TempPathFactory, name: str) -> Kernel:
    workdir = tmp_path_factory.mktemp(name)
    k = Kernel(net.kernel_env(workdir / "home"), workdir)
    k.run("import json, os\nimport notebook_ext.magics as _m")
    return k


@pytest.fixture(scope="module")
def kernel_b(net: Network, tmp_path_factory: pytest.TempPathFactory):
    k = new_kernel(net, tmp_path_factory, "kernel-b")
    yield k
    k.shutdown()


def online_names(kernel: Kernel) -> list[str]:
    return kernel.json("print(json.dumps([p.name for p in _m.get_client().providers()]))")


def run_on(kernel: Kernel, provider: str) -> int:
    """Run a cell pinned to ``provider`` from ``kernel``; the task's pid."""
    return int(kernel.run(f"%%decompute --provider {provider}\nimport os\nos.getpid()").result)


def worker_ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_provide_serves_another_kernel_then_stop_removes_it(
        net: Network, kernel_b: Kernel, tmp_path_factory: pytest.TempPathFactory) -> None:
    a = new_kernel(net, tmp_path_factory, "kernel-a")
    try:
        ex = a.run("%decompute provide --cpus 1 --price 0.5 --name from-kernel-a")
        assert "providing to" in ex.stream()
        wait_for(lambda: "from-kernel-a" in online_names(kernel_b), 15,
                 "kernel B to see kernel A's provider")
        pid = run_on(kernel_b, "from-kernel-a")
        assert pid != a.pid
        assert a.pid in {p.pid for p in psutil.Process(pid).parents()}, \
            "the task did not run in a child process of kernel A"

        state = a.json("from notebook_ext import Panel\n"
                       "_p = Panel(_m.get_client(), autostart=False)\n"
                       "print(json.dumps(_p.state()))")
        assert state["providing_shown"] is True
        assert state["providing"]["served"] >= 1 and state["providing"]["name"] == "from-kernel-a"
        assert state["providing"]["cpu_seconds"] >= 0.0

        ex = a.run("%decompute stop-providing")
        assert "stopped providing as from-kernel-a" in ex.stream()
        wait_for(lambda: "from-kernel-a" not in online_names(kernel_b), 15,
                 "kernel A's provider to leave")
        wait_for(lambda: worker_ended(pid), 15, "kernel A's task process to end")
        assert a.json("_p.refresh()\nprint(json.dumps(_p.state()['providing_shown']))") is False
    finally:
        a.shutdown()


def test_kernel_shutdown_stops_its_provider(
        net: Network, kernel_b: Kernel, tmp_path_factory: pytest.TempPathFactory) -> None:
    a = new_kernel(net, tmp_path_factory, "kernel-a2")
    try:
        a.run("%decompute provide --name from-kernel-a2")
        wait_for(lambda: "from-kernel-a2" in online_names(kernel_b), 15,
                 "kernel B to see kernel A2's provider")
        pid = run_on(kernel_b, "from-kernel-a2")
    finally:
        a.shutdown()
    wait_for(lambda: "from-kernel-a2" not in online_names(kernel_b), 15,
             "the provider of a shut-down kernel to leave")
    wait_for(lambda: worker_ended(pid), 15, "the shut-down kernel's task process to end")
