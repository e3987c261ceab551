"""Shared fixtures: real gateways and providers as processes on loopback (plain helpers, such as
``wait_for``, are in ``helpers.py``).

Nothing here mocks our own components. A gateway is ``python -m gateway`` on a free port with its
own ``DECOMPUTE_HOME``; a provider is ``python -m provider``. Every process started here is stopped
(SIGTERM, then SIGKILL) together with every process it started, and the session ends by checking
that none of them is still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cloudpickle
import psutil
import pytest
from helpers import free_port, gone, http_get, spawn, wait_for

REPO = Path(__file__).resolve().parents[1]
# Task functions defined here (``hold``) are shipped by value: task processes cannot import us.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Every process a fixture started or saw as a descendant of one: checked dead at session end.
_SEEN: list[psutil.Process] = []
#: Gate folders under /tmp, removed at session end.
_GATES: list[Path] = []
#: Every gateway ``start_gateway`` started, with its ledger file (audited after attack tests).
_GATEWAYS: list[tuple[Gateway, Path]] = []


# --------------------------------------------------------------------------- processes


def descendants(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    _SEEN.extend(kids)
    return kids


def worker_processes(pid: int) -> list[psutil.Process]:
    """The task processes (``python -m provider.worker``) below process ``pid``."""
    out = []
    for proc in descendants(pid):
        with contextlib.suppress(psutil.Error):
            if "provider.worker" in proc.cmdline():
                out.append(proc)
    return out


def kill_tree(procs: list[psutil.Process]) -> None:
    """SIGKILL processes and their process groups (workers lead their own sessions)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if proc.is_running():
                pgid = os.getpgid(proc.pid)
                if pgid == proc.pid:
                    os.killpg(pgid, signal.SIGKILL)
                proc.kill()


def stop_process(popen: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM and wait; SIGKILL what is left of the tree; never leave a process behind."""
    tree = descendants(popen.pid)
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            tree = descendants(popen.pid) + tree
            popen.kill()
            popen.wait(5)
    kill_tree([p for p in tree if not gone(p)])
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(gone(p) for p in tree), 5, message="process tree exit")


# --------------------------------------------------------------------------- gates


def hold(path: str, limit: float = 60.0) -> bool:
    """A task that runs until the test opens its gate (``path`` exists) or ``limit`` passes."""
    import os
    import time

    end = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return os.path.exists(path)


#: Where gate folders go: outside every temp dir a task gets privately, traversable by its uid.
GATE_ROOT = "/run" if os.geteuid() == 0 else os.path.expanduser("~")


@dataclass
class Gate:
    """A file the test creates to let ``hold`` tasks finish: long tasks without a cancel.

    It lives in a world-writable folder under ``GATE_ROOT``, because task processes run as other
    uids and get their own /tmp, /var/tmp and /dev/shm: they see neither the host's nor the test's
    private temp directories.
    """

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> None:
        self.path.touch()


@pytest.fixture
def gate() -> Iterator[Gate]:
    folder = Path(tempfile.mkdtemp(prefix="decompute-test-gate-", dir=GATE_ROOT))
    folder.chmod(0o777)
    _GATES.append(folder)  # removed at session end: a holder may still be about to look
    g = Gate(folder / "open")
    try:
        yield g
    finally:
        g.open()  # whatever still holds finishes now


# --------------------------------------------------------------------------- processes


@dataclass
class Gateway:
    """A running ``python -m gateway``."""

    proc: subprocess.Popen
    port: int
    home: Path
    log: Path
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        status, body = http_get(self.port, "/health")
        assert status == 200, body
        return json.loads(body)

    def wait_providers(self, n: int, timeout: float = 60.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc.poll() is None, f"gateway exited:\n{self.log_text()}"
            with contextlib.suppress(OSError, AssertionError):
                health = self.health()
                if health["providers"] == n:
                    return health
            return None

        return wait_for(ready, timeout, interval=0.05, message=f"{n} providers online")

    def provider_pids(self) -> list[int]:
        """The local provider processes (direct children running ``-m provider``)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in kids if _cmdline(p)[1:3] == ["-m", "provider"]]

    def worker_pids(self) -> set[int]:
        return {p.pid for p in worker_processes(self.proc.pid)}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        stop_process(self.proc)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def start_gateway(tmp: Path, *, local_providers: int = 0, extra: tuple[str, ...] = (),
                  timeout: float = 60.0) -> Gateway:
    """A gateway on a free port, ready (and with its local providers online) when returned."""
    tmp.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):  # a free port can be taken by someone else before we bind it
        port = free_port()
        log = tmp / f"gateway-{attempt}.log"
        cmd = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
               "--db", str(tmp / "ledger.sqlite"), "--faucet", "1000",
               "--local-providers", str(local_providers), *extra]
        proc = spawn(cmd, tmp / "gateway-home", log, REPO)
        _SEEN.append(psutil.Process(proc.pid))
        gw = Gateway(proc, port, tmp / "gateway-home", log)
        try:
            gw.wait_providers(local_providers, timeout)
            db = Path(extra[extra.index("--db") + 1]) if "--db" in extra else tmp / "ledger.sqlite"
            _GATEWAYS.append((gw, db))
            return gw
        except AssertionError:
            gw.stop()
            if "address already in use" not in gw.log_text():
                raise
    raise RuntimeError("could not find a free port for the gateway")


@dataclass
class ProviderProcess:
    """A running ``python -m provider`` with its own identity."""

    proc: subprocess.Popen
    name: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[psutil.Process]:
        return worker_processes(self.proc.pid)

    def sigkill(self) -> list[psutil.Process]:
        """SIGKILL the provider alone (as a crash would); returns its workers, still alive."""
        workers = self.workers()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return workers

    def stop(self) -> None:
        stop_process(self.proc)


def start_provider(gateway: Gateway, tmp: Path, name: str, cpus: int = 1,
                   extra: tuple[str, ...] = ()) -> ProviderProcess:
    home = tmp / f"provider-{name}"
    home.mkdir(parents=True, exist_ok=True)
    log = tmp / f"provider-{name}.log"
    cmd = [sys.executable, "-m", "provider", gateway.url, "--name", name, "--cpus", str(cpus),
           *extra]
    proc = spawn(cmd, home, log, REPO)
    _SEEN.append(psutil.Process(proc.pid))
    return ProviderProcess(proc, name, log)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def gateways_of_module() -> int:
    """Where this module's gateways begin in ``_GATEWAYS`` (autouse, so it is set up before the
    module's own fixtures start any)."""
    return len(_GATEWAYS)


@pytest.fixture(autouse=True)
def attack_books(request: pytest.FixtureRequest, gateways_of_module: int) -> Iterator[None]:
    """Issue 9, acceptance 12: after every test of an attack file (``test_attack_*.py``), every
    ledger of a gateway its module started is conserved, and a gateway still running holds no
    escrow once the test's tasks are over (finished, failed, cancelled or gone)."""
    yield
    if not request.module.__name__.startswith("test_attack_"):
        return
    from money_audit import books_settle

    from gateway.ledger import Ledger

    for gw, db in _GATEWAYS[gateways_of_module:]:
        if not db.exists():
            continue
        if gw.proc.poll() is None:
            books_settle(db)
        else:  # stopped: what it held when it stopped is recovered at its next start
            with Ledger(db) as led:
                led.check()


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes() -> Iterator[None]:
    """After the whole session, every process our fixtures started (and theirs) has exited."""
    yield
    descendants(os.getpid())
    with contextlib.suppress(AssertionError):  # a process told to stop gets a moment to exit
        wait_for(lambda: all(gone(p) for p in _SEEN), 5, interval=0.05)
    alive = [p for p in _SEEN if not gone(p)]
    kill_tree(alive)
    for folder in _GATES:
        shutil.rmtree(folder, ignore_errors=True)
    assert not alive, f"processes left running: {[(p.pid, _cmdline(p)) for p in alive]}"


def gateway_fixture(name: str, local_providers: int,
                    scope: Literal["session", "module"] = "module") -> Any:
    """A fixture: a gateway with ``local_providers`` local providers (``start_gateway`` in a tmp
    dir named ``name``), stopped when ``scope`` ends. Assign it to the fixture's name."""

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        gw = start_gateway(tmp_path_factory.mktemp(name), local_providers=local_providers)
        yield gw
        gw.stop()

    return fixture


#: One gateway with two local providers, shared by the tests that do not kill anything.
gateway = gateway_fixture("gateway", local_providers=2, scope="session")


@pytest.fixture(scope="session")
def client_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One client identity for the session: its workers stay warm across tests."""
    return tmp_path_factory.mktemp("client")


@pytest.fixture(scope="session")
def client(gateway: Gateway, client_home: Path) -> Iterator[Any]:
    from notebook_ext import Client

    with Client(gateway.url, home=client_home, stream_output=False) as c:
        yield c
