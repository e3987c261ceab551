"""Real processes for the notebook tests: a gateway with priced providers, and Jupyter kernels.

Imported explicitly by the notebook test modules (``from kernel_fixtures import ...``); it is not
a conftest. Everything runs on loopback with a free port and its own ``DECOMPUTE_HOME`` under the
test's tmp dir, and every wait is on a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import free_port, home_env, http_get, spawn
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: ``helpers.wait_for`` polling every 0.05 s: these conditions mostly cost a request or a cell.
wait_for = functools.partial(helpers.wait_for, interval=0.05)


class Network:
    """A gateway subprocess and ``providers`` provider subprocesses priced at ``price``."""

    def __init__(self, tmp: Path, providers: int = 2, price: float = 1.0,
                 faucet: float = 1000.0) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.n_providers = providers
        self.price = price
        self.faucet = faucet
        self.procs: list[subprocess.Popen] = []
        self.providers: list[subprocess.Popen] = []

    def _spawn(self, cmd: list[str], home: Path, log: str) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        proc = spawn(cmd, home, self.tmp / log, self.tmp)
        self.procs.append(proc)
        return proc

    def start(self) -> Network:
        # DC_TEST_LOG=INFO makes the gateway's log (gateway.log in the tmp dir) say more
        self._spawn([PY, "-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port),
                     "--db", str(self.tmp / "ledger.sqlite"), "--faucet", str(self.faucet),
                     "--log-level", os.environ.get("DC_TEST_LOG", "WARNING")],
                    self.tmp / "gateway-home", "gateway.log")
        wait_for(self.health, 30, "the gateway's /health")
        for i in range(self.n_providers):
            self.providers.append(self.start_provider(i))
        self.wait_providers(self.n_providers)
        return self

    def start_provider(self, i: int) -> subprocess.Popen:
        """Provider ``p{i}`` with its own home (the same identity when started again)."""
        return self._spawn([PY, "-m", "provider", self.url, "--name", f"p{i}", "--cpus", "1",
                            "--price-cpu", str(self.price), "--log-level", "WARNING"],
                           self.tmp / f"provider-{i}", f"provider-{i}.log")

    def health(self) -> dict | None:
        try:
            status, body = http_get(self.port, "/health", timeout=2)
        except OSError:
            for proc in self.procs[:1]:
                if proc.poll() is not None:
                    raise RuntimeError("the gateway exited; see gateway.log") from None
            return None
        return json.loads(body) if status == 200 else None

    def wait_providers(self, n: int, timeout: float = 30.0) -> dict:
        return wait_for(lambda: (h := self.health()) and h["providers"] == n and h,
                        timeout, f"{n} providers online")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kernel_env(self, home: Path) -> dict[str, str]:
        """The environment a kernel needs to use its own identity against this network."""
        home.mkdir(parents=True, exist_ok=True)
        return home_env(home, DECOMPUTE_GATEWAY=self.url)


def network_fixture(name: str, providers: int = 2) -> Any:
    """A module-scoped fixture: a started :class:`Network` with ``providers`` providers in a tmp
    dir named ``{name}-net``, stopped after the module. Assign it to ``net``."""

    @pytest.fixture(scope="module")
    def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
        network = Network(tmp_path_factory.mktemp(f"{name}-net"), providers=providers).start()
        yield network
        network.stop()

    return net


@dataclass
class Execution:
    """One ``execute_request``: its reply and every iopub message it caused."""

    reply: dict
    messages: list[dict] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    def stream(self, name: str = "stdout") -> str:
        return "".join(m["content"]["text"] for m in self.messages
                       if m["msg_type"] == "stream" and m["content"]["name"] == name)

    @property
    def result(self) -> str | None:
        """``text/plain`` of the execute_result (the ``Out[...]``), if any."""
        for m in self.messages:
            if m["msg_type"] == "execute_result":
                return m["content"]["data"]["text/plain"]
        return None

    @property
    def error(self) -> dict | None:
        """The error shown; a UsageError is only printed, so the reply is the fallback."""
        for m in self.messages:
            if m["msg_type"] == "error":
                return m["content"]
        return self.reply["content"] if self.status == "error" else None

    def displays(self) -> list[dict]:
        return [m["content"] for m in self.messages
                if m["msg_type"] in ("display_data", "update_display_data")]


class Kernel:
    """A real IPython kernel (jupyter_client) with ``notebook_ext`` loaded."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.km = KernelManager(kernel_name="python3",
                                connection_file=str(workdir / "kernel-connection.json"))
        self.km.start_kernel(env=env, cwd=str(workdir),
                             stdout=open(workdir / "kernel.log", "wb"),  # noqa: SIM115
                             stderr=subprocess.STDOUT)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.pid = int(self.run("import os; print(os.getpid())").stream().strip())
        self.run("%load_ext notebook_ext")

    def execute(self, code: str, timeout: float = 60.0,
                on_message: Callable[[dict], None] | None = None) -> Execution:
        messages: list[dict] = []

        def hook(msg: dict) -> None:
            messages.append(msg)
            if on_message is not None:
                on_message(msg)

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout,
                                            allow_stdin=False)
        return Execution(reply, messages)

    def run(self, code: str, timeout: float = 60.0) -> Execution:
        """Execute and require success (the failure message shows the kernel's error)."""
        ex = self.execute(code, timeout)
        if ex.status != "ok":
            err = ex.error or {}
            tb = "\n".join(err.get("traceback", []))
            raise AssertionError(f"cell failed: {err.get('ename')}: {err.get('evalue')}\n{tb}\n"
                                 f"stderr: {ex.stream('stderr')}")
        return ex

    def json(self, code: str, timeout: float = 60.0) -> Any:
        """Run ``code`` whose last stdout line is JSON; return it decoded."""
        return json.loads(self.run(code, timeout).stream().strip().splitlines()[-1])

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def kernel_fixture(name: str, setup: Callable[[Kernel], object]) -> Any:
    """A module-scoped fixture: a :class:`Kernel` on the module's ``net`` with its own identity
    (tmp dir ``{name}-kernel``), prepared by ``setup(kernel)``, shut down after the module.
    Assign it to ``kernel``."""

    @pytest.fixture(scope="module")
    def kernel(net: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
        workdir = tmp_path_factory.mktemp(f"{name}-kernel")
        k = Kernel(net.kernel_env(workdir / "home"), workdir)
        setup(k)
        yield k
        k.shutdown()

    return kernel
