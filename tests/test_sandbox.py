"""provider/sandbox.py with real processes: what a task worker can and cannot do."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from provider.metering import Meter
from provider.sandbox import (
    Isolation,
    Limits,
    SandboxSpec,
    _rlimits,
    cleanup,
    describe,
    kill_cgroup,
    probe_isolation,
    sandbox_spec,
    strays,
    worker_pid,
)

ISO = probe_isolation()
MiB = 1 << 20
PARENT_ONLY = {"SECRET_TOKEN": "s3cr3t", "DECOMPUTE_HOME": "/nonexistent/home", "AWS_API_KEY": "k"}


def start(code: str, *args: str, limits: Limits | None = None, **kw: object) -> SandboxSpec:
    return sandbox_spec([sys.executable, "-c", code, *args], limits=limits or Limits(), **kw)


def run(spec: SandboxSpec, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True, check=False)


def run_once(code: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    spec = start(code, *args, **kw)
    try:
        return run(spec)
    finally:
        cleanup(spec)


CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    print("connected")
except OSError as exc:
    print("blocked", type(exc).__name__)
"""


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield srv.getsockname()[1]


@pytest.mark.skipif(not ISO.network, reason=f"no network namespace on this host: {ISO.reason}")
def test_worker_cannot_reach_a_listening_loopback_port(listener: int) -> None:
    socket.create_connection(("127.0.0.1", listener), timeout=2).close()  # it is really there
    out = run_once(CONNECT, str(listener))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("blocked"), out.stdout


def test_without_isolation_the_same_connect_succeeds(listener: int) -> None:
    """Control for the test above: proves the probe program would notice a reachable port."""
    none = Isolation(network=False, method="none", reason="test control")
    out = run_once(CONNECT, str(listener), isolation=none)
    assert out.stdout.strip() == "connected", out.stderr


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PARENT_ONLY.items():
        monkeypatch.setenv(name, value)
    out = run_once("import json, os; print(json.dumps(dict(os.environ)))",
                   extra_env={"OMP_NUM_THREADS": "2"})
    env = json.loads(out.stdout)
    assert not set(PARENT_ONLY) & set(env)
    assert not set(PARENT_ONLY.values()) & set(env.values())
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONUNBUFFERED", "PYTHONPATH",
               "PYTHONDONTWRITEBYTECODE", "PYTHONNOUSERSITE", "OPENBLAS_NUM_THREADS",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    assert set(env) <= allowed, set(env) - allowed
    assert env["HOME"] == env["TMPDIR"] and env["OMP_NUM_THREADS"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert "/.venv" not in env["PATH"]
    for package in ("provider", "gateway"):  # importable from the install, not the host's path
        assert any(Path(d, package, "__init__.py").exists() for d in env["PYTHONPATH"].split(":"))


READ_KEYS = """
import subprocess, sys
for path in sys.argv[1:]:  # try to undo the hiding first
    subprocess.run(["umount", "-l", path], capture_output=True)
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            print("read", repr(f.read()))
    except OSError as exc:
        print("denied", type(exc).__name__)
"""

# With both defences, also check the mount alone: root without capabilities, hidden key dir.
KEY_VARIANTS = [ISO] + [dataclasses.replace(ISO, own_uid=False)] * (ISO.hide and ISO.own_uid)


@pytest.mark.parametrize("iso", KEY_VARIANTS, ids=lambda i: f"hide={i.hide}-own_uid={i.own_uid}")
def test_worker_cannot_read_the_key_file(iso: Isolation, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not (iso.hide or iso.own_uid):
        pytest.skip(f"no mount namespace and no separate uid here: {iso.reason}")
    home = tmp_path / "decompute-home"
    home.mkdir(mode=0o700)
    key, loose = home / "provider.key", tmp_path / "loose.key"  # a directory and a lone file
    for path in (key, loose):
        path.write_text("PRIVATE KEY")
        path.chmod(0o600)
    monkeypatch.setenv("DECOMPUTE_HOME", str(home))
    out = run_once(READ_KEYS, str(key), str(loose), isolation=iso, hide_paths=[home, loose])
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2, out.stderr
    assert "PRIVATE" not in out.stdout, out.stdout
    assert key.read_text() == loose.read_text() == "PRIVATE KEY"  # the host's copies are intact


@pytest.mark.skipif(not ISO.hide, reason=f"no mount namespace here: {ISO.reason}")
def test_workdir_inside_a_hidden_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside hidden path"):
        start("pass", workdir_root=tmp_path, hide_paths=[tmp_path])
    assert list(tmp_path.iterdir()) == []  # the half-made workdir was removed


def test_memory_limit_raises_memoryerror_inside() -> None:
    code = ("import sys\ntry:\n    b = bytearray(1 << 30)\nexcept MemoryError:\n"
            "    print('MemoryError'); sys.exit(0)\nprint('allocated'); sys.exit(3)")
    out = run_once(code, limits=Limits(memory_bytes=512 * MiB))
    assert (out.returncode, out.stdout.strip()) == (0, "MemoryError"), out.stderr


def test_cpu_limit_kills_a_busy_loop() -> None:
    started = time.monotonic()
    out = run_once("while True: pass", limits=Limits(cpu_seconds=1))
    assert out.returncode in (-signal.SIGXCPU, -signal.SIGKILL), out
    assert time.monotonic() - started < 10


def test_file_size_limit_stops_a_large_write() -> None:
    code = """
import errno, os
try:
    with open("big", "wb") as f:
        f.write(b"x" * (4 << 20))
    print("wrote", os.path.getsize("big"))
except OSError as exc:
    print(errno.errorcode[exc.errno], os.path.getsize("big"))
"""
    out = run_once(code, limits=Limits(file_bytes=1 * MiB))
    name, size = out.stdout.split()
    assert name == "EFBIG" and int(size) <= MiB, out.stdout + out.stderr


@pytest.mark.skipif(not (ISO.own_uid or ISO.method == "unshare -rn"),
                    reason=f"RLIMIT_NPROC is not applied without a per-task uid or user ns: {ISO}")
def test_process_limit_stops_a_fork_loop() -> None:
    code = """
import subprocess
procs = []
try:
    for _ in range(30):
        procs.append(subprocess.Popen(["sleep", "5"]))
    print("unlimited", len(procs))
except OSError:
    print("limited", len(procs))
for p in procs:
    p.kill()
"""
    out = run_once(code, limits=Limits(processes=8))
    verdict, count = out.stdout.split()
    assert verdict == "limited" and int(count) < 8, out.stdout + out.stderr


def test_cwd_is_private_and_cleanup_never_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    code = """
import os, stat, sys
os.symlink(sys.argv[1], "link-to-file")
os.symlink(os.path.dirname(sys.argv[1]), "link-to-dir")
os.makedirs("locked/deeper")
open("locked/deeper/data", "w").write("x")
open("readonly", "w").write("x")
os.chmod("readonly", 0o400)
os.chmod("locked/deeper", 0o500)
os.chmod("locked", 0)
print(os.getcwd(), oct(stat.S_IMODE(os.stat("readonly").st_mode)))
"""
    spec = start(code, str(outside))
    try:
        st = os.stat(spec.cwd)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == (spec.uid if spec.uid is not None else os.geteuid())
        out = run(spec)
        assert out.stdout.split() == [spec.cwd, "0o400"], out.stderr
    finally:
        cleanup(spec)
    assert not os.path.lexists(spec.cwd)
    assert outside.read_text() == "keep me" and tmp_path.is_dir()


@pytest.mark.skipif(not ISO.own_uid, reason="only a per-task uid lets cleanup find every leftover")
def test_cleanup_kills_processes_the_task_left_behind() -> None:
    code = ("import subprocess\n"
            "p = subprocess.Popen(['sleep', '60'], start_new_session=True,\n"
            "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.pid)")
    spec = start(code)
    try:
        pid = int(run(spec).stdout)
        assert Path(f"/proc/{pid}").exists()
    finally:
        cleanup(spec)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_numpy_works_inside() -> None:
    code = ("import sys, numpy as np\na = np.ones((200, 200))\n"
            "print(sys.version_info[:2] == tuple(map(int, sys.argv[1].split('.'))), (a @ a)[0, 0])")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = run_once(code, version, limits=Limits(memory_bytes=2048 * MiB, cpu_seconds=30,
                                                file_bytes=64 * MiB, open_files=256, processes=64))
    assert out.stdout.split() == ["True", "200.0"], out.stderr


NON_ROOT_WORKER = """
import socket, subprocess, sys
port, home, key = sys.argv[1:4]
try:
    socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
    print("connected")
except OSError:
    print("blocked")
subprocess.run(["umount", "-l", home], capture_output=True)
try:
    print("READ", open(key).read())
except OSError:
    print("denied")
"""

NON_ROOT_PROVIDER = """
import socket, subprocess, sys, tempfile
from pathlib import Path
from provider.sandbox import Limits, cleanup, probe_isolation, sandbox_spec
iso = probe_isolation()
home = Path(tempfile.mkdtemp())
(home / "key").write_text("PRIVATE KEY")
srv = socket.create_server(("127.0.0.1", 0))
argv = [sys.executable, "-c", sys.argv[1], str(srv.getsockname()[1]), str(home), str(home / "key")]
spec = sandbox_spec(argv, limits=Limits(processes=16), hide_paths=[home])
out = subprocess.run(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                     capture_output=True, text=True, timeout=20)
cleanup(spec)
print(iso.method, iso.hide, out.stdout, out.stderr)
"""


AS_NON_ROOT = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "--"]


def _interpreter_for_non_root() -> str | None:
    """An interpreter uid 65533 can exec itself (a pyenv under a 0700 /root is not one)."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        check = [*AS_NON_ROOT, "/bin/sh", "-c", '"$0" -c pass', python]
        if subprocess.run(check, capture_output=True, timeout=10, check=False).returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to impersonate a non-root provider")
def test_non_root_provider_gets_user_namespace_isolation(tmp_path: Path) -> None:
    python = _interpreter_for_non_root()
    if python is None:
        pytest.skip("no Python interpreter here that a non-root uid may execute")
    tmp_path.chmod(0o755)
    argv = [*AS_NON_ROOT, python, "-c", NON_ROOT_PROVIDER, NON_ROOT_WORKER]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         check=False)
    words = out.stdout.split()
    if words[:1] != ["unshare"]:
        pytest.skip(f"user namespaces unavailable to non-root here: {out.stdout}{out.stderr}")
    assert words[:3] == ["unshare", "-rn", "True"], out.stdout + out.stderr
    assert words[3:5] == ["blocked", "denied"], out.stdout + out.stderr


def test_probe_is_cached_and_describe_is_loud_when_weak() -> None:
    assert probe_isolation() is ISO
    assert ISO.strength == ("strong" if ISO.network and ISO.hide and ISO.contained else "weak")
    uncontained = Isolation(network=True, method="unshare -n", reason="no pid ns", hide=True)
    assert uncontained.strength == "weak" and describe(uncontained).startswith("WARNING")
    weak = Isolation(network=False, method="none", reason="unshare: Operation not permitted")
    assert weak.strength == "weak" and describe(weak).startswith("WARNING: tasks can reach the net")
    assert "\n" not in describe(ISO)
    if ISO.network:
        assert "strong" in describe(ISO) and "WARNING" not in describe(ISO)


# --------------------------------------------------------------------------- containment

DAEMON = """
import os, subprocess, sys, time
if os.fork() == 0:  # double fork: the daemon leaves our process tree and our session
    subprocess.Popen(["/bin/sh", "-c", "while :; do :; done", sys.argv[1] + "-d"],
                     start_new_session=True)
    os._exit(0)
os.wait()
print("started", flush=True)
time.sleep(120)  # until the test kills it (stdin is /dev/null under a PID namespace's init)
"""

# Each way of finding every process a task left behind: what this host has, then the fallbacks.
CONTAINMENT = {
    "cgroup": ISO,
    "pid-namespace": dataclasses.replace(ISO, cgroup=False, pid=True),
    # as a non-root provider has it: no cgroup, no uid of its own; the namespace alone holds
    "pid-namespace-only": dataclasses.replace(ISO, cgroup=False, pid=True, own_uid=False),
    "uid-sweep": dataclasses.replace(ISO, cgroup=False, pid=False),
}


def _tagged(tag: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (tag + "-d").encode() in argv and _alive(int(pid)):
            found.append(int(pid))
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


@pytest.mark.parametrize("name", list(CONTAINMENT))
def test_a_setsid_daemon_is_found_metered_and_killed_with_its_worker(name: str) -> None:
    iso = CONTAINMENT[name]
    if name == "cgroup" and not iso.cgroup:
        pytest.skip(f"no cgroup v2 for workers here: {iso.reason}")
    if name == "uid-sweep" and not iso.own_uid:
        pytest.skip(f"no per-task uid here (not root?): {iso.reason}")
    tag = f"decompute-test-daemon-{os.getpid()}-{name}"
    spec = start(DAEMON, tag, isolation=iso)
    proc = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, preexec_fn=spec.preexec_fn,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        if name.startswith("pid-namespace") and not spec.pid_namespace:
            pytest.skip("this host cannot make a PID namespace")
        worker = worker_pid(spec, proc.pid)
        meter = Meter(psutil.Process(worker))
        daemon = _wait(lambda: _tagged(tag), 10, "the daemon")[0]
        assert daemon in strays(spec, proc.pid, worker)
        if name != "uid-sweep":  # there the daemon leaves the metered tree (documented)
            _wait(lambda: meter.sample(tree=True)["cpu_seconds"] >= 0.3, 10, "daemon CPU")
        if spec.cgroup is not None:
            kill_cgroup(spec.cgroup)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        cleanup(spec)
        _wait(lambda: not _tagged(tag), 5, "the daemon to die with its worker")
    finally:
        proc.kill()
        proc.wait(10)
        cleanup(spec)


def kept_names() -> set[str]:
    """Top-level names the sandbox binds back into a private temp dir (a checkout or venv that
    lives under /tmp): the task sees them there, and nothing else of the host's."""
    from provider.sandbox import PRIVATE_TMP_DIRS, _kept_under_private_tmp
    return {Path(p).relative_to(d).parts[0] for p in _kept_under_private_tmp()
            for d in PRIVATE_TMP_DIRS if Path(p).is_relative_to(d) and Path(p) != Path(d)}


def test_tmp_var_tmp_and_dev_shm_are_private_and_writable(tmp_path: Path) -> None:
    if not ISO.hide:
        pytest.skip(f"no mount namespace here: {ISO.reason}")
    planted = Path(tempfile.mkdtemp(prefix="decompute-test-planted-", dir="/tmp"))
    mine = f"decompute-test-written-{os.getpid()}"
    code = """
import os, sys
print(os.path.exists(sys.argv[1]), os.getcwd() == os.environ["HOME"])
kept = sys.argv[3].split(",")  # the interpreter's or checkout's folders, bound back in place
for d in ("/tmp", "/var/tmp", "/dev/shm"):
    open(os.path.join(d, sys.argv[2]), "w").write("x")
    seen = [n for n in os.listdir(d) if not n.startswith("decompute-task-") and n not in kept]
    print(d, seen == [sys.argv[2]])
"""
    try:
        out = run_once(code, str(planted), mine, ",".join(kept_names()))
    finally:
        planted.rmdir()
    assert out.stdout.split() == ["False", "True", "/tmp", "True", "/var/tmp", "True",
                                  "/dev/shm", "True"], out.stdout + out.stderr
    assert not any(Path(d, mine).exists() for d in ("/tmp", "/var/tmp", "/dev/shm"))


def test_hide_env_and_nested_hidden_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not ISO.hide:
        pytest.skip(f"no mount namespace here: {ISO.reason}")
    outer = tmp_path / "gateway-home"
    (inner := outer / "local-providers" / "local-0").mkdir(parents=True)
    (secret := outer / "gateway.key").write_text("PRIVATE")
    (inner / "provider.key").write_text("PRIVATE")
    for path in (tmp_path, outer, outer / "local-providers", inner):
        path.chmod(0o755)
    monkeypatch.setenv("DECOMPUTE_HOME", str(inner))  # the provider's home, inside the other
    monkeypatch.setenv("DECOMPUTE_HIDE", str(outer))
    shared = Path("/run" if os.geteuid() == 0 else Path.home())
    out = run_once(READ_KEYS, str(secret), str(inner / "provider.key"),
                   workdir_root=shared if shared.is_dir() else None)
    assert out.returncode == 0 and "PRIVATE" not in out.stdout, out.stdout + out.stderr


def test_meter_counts_children_cpu_from_proc_stat() -> None:
    burn = "import time\nwhile time.process_time() < 0.5: pass"
    code = ("import subprocess, sys\nsys.stdin.readline()\n"
            f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
            "print('done', flush=True)\nsys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        meter = Meter(psutil.Process(proc.pid), cgroup=None)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        assert meter.sample()["cpu_seconds"] >= 0.45  # the reaped child's CPU, in cutime
    finally:
        proc.kill()
        proc.wait(10)


def test_default_limits_name_every_rlimit() -> None:
    limits = Limits(memory_bytes=1 << 30)
    assert None not in (limits.cpu_seconds, limits.file_bytes, limits.open_files,
                        limits.processes)
    names = {which for which, _ in _rlimits(limits, with_nproc=True)}
    assert names == {resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                     resource.RLIMIT_NOFILE, resource.RLIMIT_CORE, resource.RLIMIT_NPROC}
