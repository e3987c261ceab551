"""Issue 9, acceptance 10: a sandbox that holds, attacked by tasks that misbehave on purpose.

Every task here runs through a real ``decompute-gateway --local-providers 1`` (gateway, provider and
sandboxed worker processes on loopback). Each attack is checked the way a volunteer would: the
fork bomb is stopped and the provider serves the next task; a double-forked daemon is gone soon
after its task ends and its CPU was billed; the host's /tmp (and its unix sockets) are out of reach;
the gateway's ledger and key are hidden from tasks even when their file modes would allow reading.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import REPO, Gate, Gateway, gateway_fixture, hold, start_gateway, stop_process
from helpers import gone, spawn, wait_for

from notebook_ext import Client
from provider.sandbox import Limits, probe_isolation

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ISO = probe_isolation()
RESULT_TIMEOUT = 60
FORKS = 1_500

net = gateway_fixture("sandbox-attack", local_providers=1)


@pytest.fixture(scope="module")
def user(net: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with Client(net.url, home=tmp_path_factory.mktemp("attacker"), stream_output=False) as c:
        yield c


def add(x: int, y: int) -> int:
    return x + y


# --------------------------------------------------------------------------- tasks


def fork_bomb(n: int) -> tuple[int, str]:
    """Fork up to ``n`` sleeping children; return how many forks succeeded and why it stopped."""
    import os
    import time

    made = 0
    try:
        for _ in range(n):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            made += 1
    except OSError as exc:
        return made, type(exc).__name__
    return made, "unlimited"


def leave_a_daemon(tag: str, cpu_seconds: float) -> int:
    """Double-fork a ``setsid`` child that burns CPU forever; return once it has burnt
    ``cpu_seconds`` (read from its /proc stat, so a loaded machine does not matter)."""
    import os
    import subprocess
    import time

    r, w = os.pipe()
    if os.fork() == 0:  # the middle child: start the daemon in a new session, then vanish
        daemon = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done", tag],
                                  start_new_session=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.write(w, str(daemon.pid).encode())
        os._exit(0)
    os.wait()
    pid = int(os.read(r, 32))
    end = time.monotonic() + 120
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") >= cpu_seconds:
            break
        time.sleep(0.05)
    return pid


def try_unix_socket(path: str) -> str:
    import os
    import socket

    seen = os.path.exists(path)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(3)
            s.connect(path)
            return "connected"
    except OSError as exc:
        return f"refused seen={seen} {type(exc).__name__}"


def visible(paths: list[str]) -> dict[str, bool]:
    import os

    return {p: os.path.exists(p) for p in paths}


def read_each(paths: list[str]) -> dict[str, str]:
    out = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                out[path] = f.read(64).decode("latin-1")
        except OSError as exc:
            out[path] = f"denied {type(exc).__name__}"
    return out


def _processes_tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if tag in (proc.info["cmdline"] or []) and not gone(proc):
            found.append(proc)
    return found


# --------------------------------------------------------------------------- 1. rlimits


def test_provider_applies_every_named_rlimit_by_default() -> None:
    limits = Limits(memory_bytes=1 << 30)  # what the provider builds: its defaults fill the rest
    assert None not in (limits.cpu_seconds, limits.file_bytes, limits.open_files,
                        limits.processes)


@pytest.mark.skipif(not (ISO.own_uid or ISO.method == "unshare -rn"),
                    reason=f"RLIMIT_NPROC needs a per-task uid or a user namespace: {ISO.reason}")
def test_fork_bomb_is_stopped_by_the_process_limit_and_the_provider_serves_on(
        user: Client) -> None:
    made, why = user.submit(fork_bomb, FORKS).result(RESULT_TIMEOUT)
    assert why == "BlockingIOError" and made < Limits().processes, (made, why)
    assert user.submit(add, 2, 3).result(RESULT_TIMEOUT) == 5


# --------------------------------------------------------------------------- 2. nothing outlives


@pytest.mark.skipif(not ISO.contained, reason=f"no PID namespace, cgroup or uid: {ISO.reason}")
def test_double_forked_setsid_daemon_dies_with_its_task_and_its_cpu_is_billed(
        user: Client) -> None:
    tag = f"decompute-test-daemon-{uuid.uuid4().hex}"
    fut = user.submit(leave_a_daemon, tag, 0.5)
    fut.result(RESULT_TIMEOUT)
    wait_for(lambda: not _processes_tagged(tag), 5, message="the task's daemon to be killed")
    if ISO.cgroup:  # the daemon's CPU is in the task's cgroup even though it left the tree
        assert fut.usage["cpu_seconds"] >= 0.5, fut.usage
    assert user.submit(add, 1, 1).result(RESULT_TIMEOUT) == 2


def daemon_then(tag: str, gate: str, how: str) -> None:
    """Leave a daemon, wait for the test to see it, then end badly: raise, or hang past the
    task's timeout."""
    import time

    leave_a_daemon(tag, 0.05)
    hold(gate)
    if how == "raise":
        raise ValueError("failing on purpose")
    time.sleep(600)


@pytest.mark.skipif(not ISO.contained, reason=f"no PID namespace, cgroup or uid: {ISO.reason}")
@pytest.mark.parametrize(("how", "error"), [("raise", ValueError), ("hang", TimeoutError)])
def test_a_daemon_dies_when_its_task_fails_or_times_out(user: Client, gate: Gate, how: str,
                                                        error: type) -> None:
    tag = f"decompute-test-daemon-{uuid.uuid4().hex}"
    fut = user.submit(daemon_then, tag, str(gate), how, timeout=6)
    wait_for(lambda: _processes_tagged(tag), 30, message="the daemon to start")
    gate.open()
    with pytest.raises(error):
        fut.result(RESULT_TIMEOUT)
    wait_for(lambda: not _processes_tagged(tag), 5, message=f"the daemon of a task that {how}s")


@pytest.mark.skipif(not ISO.contained, reason=f"no PID namespace, cgroup or uid: {ISO.reason}")
def test_a_daemon_dies_when_its_task_is_cancelled(user: Client) -> None:
    tag = f"decompute-test-daemon-{uuid.uuid4().hex}"
    fut = user.submit(leave_a_daemon, tag, 1_000)
    wait_for(lambda: _processes_tagged(tag), 30, message="the daemon to start")
    fut.cancel()
    wait_for(lambda: not _processes_tagged(tag), 5, message="the cancelled task's daemon to die")


# --------------------------------------------------------------------------- 3. private /tmp


@pytest.mark.skipif(not ISO.hide, reason=f"no mount namespace here: {ISO.reason}")
def test_task_cannot_connect_to_a_unix_socket_in_the_host_tmp(user: Client) -> None:
    path = f"/tmp/decompute-test-{uuid.uuid4().hex[:12]}.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        os.chmod(path, 0o777)  # no file mode stands in the way: only the sandbox does
        srv.listen()
        try:
            with socket.socket(socket.AF_UNIX) as probe:  # control: it really is listening
                probe.connect(path)
            verdict = user.submit(try_unix_socket, path).result(RESULT_TIMEOUT)
        finally:
            os.unlink(path)
    assert verdict.startswith("refused seen=False"), verdict


@pytest.mark.skipif(not ISO.hide, reason=f"no mount namespace here: {ISO.reason}")
def test_tmp_var_tmp_and_dev_shm_are_private(user: Client) -> None:
    name = f"decompute-test-{uuid.uuid4().hex[:12]}"
    planted = [Path(d, name) for d in ("/tmp", "/var/tmp", "/dev/shm") if Path(d).is_dir()]
    for path in planted:
        path.write_text("host file")
        path.chmod(0o644)
    try:
        seen = user.submit(visible, [str(p) for p in planted]).result(RESULT_TIMEOUT)
    finally:
        for path in planted:
            path.unlink()
    assert seen == {str(p): False for p in planted}


# --------------------------------------------------------------------------- 4. ledger hidden


def _shared_state_root() -> Path:
    """A folder outside /tmp that task uids may traverse: the test must not pass merely because
    /tmp is private."""
    return Path("/run") if os.geteuid() == 0 else Path.home()


@pytest.mark.skipif(not ISO.hide, reason=f"no mount namespace here: {ISO.reason}")
def test_local_providers_tasks_cannot_read_the_gateways_ledger_or_key(tmp_path: Path) -> None:
    root = _shared_state_root() / f"decompute-test-ledger-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    try:
        gw = start_gateway(root, local_providers=1)
        try:
            db = root / "ledger.sqlite"
            home_files = [p for p in gw.home.rglob("*") if p.is_file()]
            control = root / "not-secret.txt"
            control.write_text("plain")
            for path in [db, control, *home_files]:  # as if nobody had made them 0600
                path.chmod(0o644)
            for folder in [root, *(p for p in gw.home.rglob("*") if p.is_dir()), gw.home]:
                folder.chmod(0o755)
            targets = [str(db), str(control), *map(str, home_files)]
            real = {t: read_each([t])[t] for t in targets}  # what an unhidden read would get
            with Client(gw.url, home=tmp_path / "reader", stream_output=False) as c:
                got = c.submit(read_each, targets).result(RESULT_TIMEOUT)
        finally:
            gw.stop()
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert got.pop(str(control)) == "plain", "control: the task can reach this folder"
    assert home_files, "the gateway has a key in its home"
    assert real[str(db)].startswith("SQLite format 3")
    for path, text in got.items():
        assert text != real[path], f"a task read {path}"


@pytest.mark.skipif(not ISO.hide, reason=f"no mount namespace here: {ISO.reason}")
def test_provider_hide_flag_hides_a_path_from_its_tasks(net: Gateway, user: Client,
                                                         tmp_path: Path) -> None:
    root = _shared_state_root() / f"decompute-test-hide-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o755)
    secret, control = root / "secret.txt", root / "plain.txt"
    secret.write_text("operator secret")
    control.write_text("plain")
    for path in (secret, control):
        path.chmod(0o644)
    home = tmp_path / "hider"
    home.mkdir()
    cmd = [sys.executable, "-m", "provider", net.url, "--name", "hider", "--cpus", "1",
           "--hide", str(secret)]
    proc = spawn(cmd, home, tmp_path / "hider.log", REPO)
    try:
        wait_for(lambda: any(p.name == "hider" for p in user.providers()), 60,
                 message="the --hide provider online")
        got = user.submit(read_each, [str(secret), str(control)],
                          providers=["hider"]).result(RESULT_TIMEOUT)
    finally:
        stop_process(proc)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert got[str(control)] == "plain", "control: the task can reach this folder"
    assert "operator secret" not in got[str(secret)], got
