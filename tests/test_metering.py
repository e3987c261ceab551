"""Metering (``provider/metering.py``) on its per-task path: files kept open per worker, read
with one ``pread`` each, and still billing every process a task started, those it left behind
included; end to end through a real gateway and provider as well."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import weakref

import cloudpickle
import psutil
import pytest
from helpers import wait_for

from provider.metering import _PROBES, Meter, probe_of, process_cpu, read_stat
from provider.sandbox import Limits, cleanup, kill_cgroup, probe_isolation, sandbox_spec, worker_pid

cloudpickle.register_pickle_by_value(sys.modules[__name__])
ISO = probe_isolation()
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


@pytest.fixture
def idle_child():
    """A plain child process waiting on stdin: ``go`` makes it burn 0.4 s of CPU."""
    code = "import sys\nsys.stdin.readline()\n" + BURN.format(s=0.4) + \
        "print('done', flush=True)\nsys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_worker_is_probed_once_and_each_task_opens_nothing(idle_child) -> None:
    ps = psutil.Process(idle_child.pid)
    first = Meter(ps, cgroup=None)
    opened: list[str] = []
    OPENS.append(opened)
    try:
        for _ in range(200):  # 200 tasks on the same worker
            meter = Meter(ps)
            meter.sample()
            assert meter.probe is first.probe
    finally:
        OPENS.remove(opened)
    assert opened == []


#: Lists that the audit hook appends every file opened to, while a test watches.
OPENS: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and OPENS:
        for opened in OPENS:
            opened.append(str(args[0]))


sys.addaudithook(_audit)


def test_the_per_task_sample_bills_the_task_cpu(idle_child) -> None:
    meter = Meter(psutil.Process(idle_child.pid))
    idle_child.stdin.write("go\n")
    idle_child.stdin.flush()
    assert idle_child.stdout.readline().strip() == "done"
    usage = meter.sample()
    assert 0.35 <= usage["cpu_seconds"] < 2.0 and usage["max_rss_bytes"] > 1 << 20
    assert meter.rss == usage["max_rss_bytes"]
    assert abs(process_cpu(psutil.Process(idle_child.pid)) - read_stat(idle_child.pid)[0]) < 0.05
    assert Meter(psutil.Process(idle_child.pid)).sample()["cpu_seconds"] < 0.1  # a new task


def test_a_dead_worker_samples_as_nothing_new_and_its_files_close(idle_child) -> None:
    ps = psutil.Process(idle_child.pid)
    meter = Meter(ps)
    kept = list(meter.probe._fds)
    assert kept and all(f"/proc/{idle_child.pid}/" in target(fd) for fd in kept[:2])
    idle_child.kill()
    idle_child.wait(10)
    assert meter.sample()["cpu_seconds"] == 0.0  # the descriptor does not read another process
    assert Meter(ps).sample()["cpu_seconds"] == 0.0
    gone = weakref.ref(meter.probe)
    del meter, ps
    gc.collect()
    assert gone() is None
    assert not any(f"/proc/{idle_child.pid}/" in target(fd) for fd in kept)


def target(fd: int) -> str:
    """What a descriptor of this process is open on ("" once closed)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_a_reused_pid_gets_a_probe_of_its_own(idle_child) -> None:
    ps = psutil.Process(idle_child.pid)
    probe = probe_of(ps)
    other = psutil.Process(os.getpid())
    assert probe_of(other) is not probe and probe_of(ps) is probe
    assert ps in _PROBES


ORPHAN = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    if os.fork() == 0:  # the grandchild: orphaned, outside the worker's process tree
        os.close(r)
        {burn}
        os._exit(0)
    os._exit(0)
os.close(w)
os.wait()
print("started", flush=True)
os.read(r, 1)  # EOF: the orphan has ended
print("orphan done", flush=True)
time.sleep(120)  # until the test kills it
"""

CONTAINMENT = {
    "cgroup": ISO,
    "pid-namespace": dataclasses.replace(ISO, cgroup=False, pid=True),
}


@pytest.mark.parametrize("name", list(CONTAINMENT))
def test_cpu_of_a_process_the_task_left_is_billed_without_a_tree_scan(name: str) -> None:
    iso = CONTAINMENT[name]
    if name == "cgroup" and not iso.cgroup:
        pytest.skip(f"no cgroup v2 for workers here: {iso.reason}")
    code = ORPHAN.format(burn=BURN.format(s=0.4).replace("\n", "\n        "))
    spec = sandbox_spec([sys.executable, "-c", code], limits=Limits(), isolation=iso)
    proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        if name == "pid-namespace" and not spec.pid_namespace:
            pytest.skip("this host cannot make a PID namespace")
        meter = Meter(psutil.Process(worker_pid(spec, proc.pid)))
        assert proc.stdout.readline().strip() == "orphan done"
        # no tree=True: the per-task sample alone (cgroup cpu.stat, or the init's cutime)
        wait_for(lambda: meter.sample()["cpu_seconds"] >= 0.35, 10, "the orphan's CPU billed")
    finally:
        if spec.cgroup is not None:
            kill_cgroup(spec.cgroup)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        cleanup(spec)


def burn_and_leave(seconds: float) -> float:
    """A task that starts a process which outlives its parent's tree, burns CPU and ends."""
    import os
    import time
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            os.close(r)
            t = time.process_time()
            while time.process_time() - t < seconds:
                pass
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.wait()
    os.read(r, 1)
    return seconds


def burn(seconds: float) -> float:
    import time
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
    return seconds


def test_a_real_provider_bills_a_task_and_what_it_left(client) -> None:
    fut = client.submit(burn, 0.3)
    assert fut.result(60) == 0.3
    assert fut.usage["cpu_seconds"] >= 0.28, fut.usage
    fut = client.submit(burn_and_leave, 0.3)
    assert fut.result(60) == 0.3
    if ISO.cgroup or ISO.pid:  # else documented: a daemon's CPU is not metered
        assert fut.usage["cpu_seconds"] >= 0.28, fut.usage
