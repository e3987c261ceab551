"""A whole decompute network on this machine: a gateway process with local providers.

For the demo, the benchmarks, the tests and a laptop user who wants to try things out::

    with LocalNetwork(providers=2) as net:
        client = Client(net.url)

The gateway runs as its own process (``python -m gateway``), exactly as in production; this only
picks a free port, waits until ``/health`` shows the providers online and shuts it down in order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalNetwork:
    """A gateway subprocess with ``providers`` local providers, on a free loopback port."""

    def __init__(self, providers: int = 2, *, faucet: float = 1_000_000.0,
                 state_dir: str | os.PathLike | None = None, fee_percent: float = 0.0,
                 extra_args: list[str] | None = None, startup_timeout: float = 60.0,
                 quiet: bool = True) -> None:
        self.providers = providers
        self._tmp = None if state_dir else tempfile.TemporaryDirectory(prefix="decompute-")
        self.state_dir = Path(state_dir or self._tmp.name)
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.db = self.state_dir / "ledger.sqlite"
        self.args = [sys.executable, "-m", "gateway", "--host", "127.0.0.1",
                     "--port", str(self.port), "--db", str(self.db), "--faucet", str(faucet),
                     "--fee-percent", str(fee_percent), "--local-providers", str(providers),
                     *(extra_args or [])]
        self.startup_timeout = startup_timeout
        self.quiet = quiet
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir / "gateway.log"

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return json.loads(r.read())

    def start(self) -> LocalNetwork:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DECOMPUTE_HOME=str(self.state_dir / "gateway-home"))
        out = open(self.log_path, "ab") if self.quiet else None  # noqa: SIM115 - closed in stop
        self._log = out
        self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"gateway exited with {code}; see {self.log_path}")
            try:
                if self.health()["providers"] >= self.providers:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"gateway or providers not up in {self.startup_timeout} s; "
                           f"see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM: the gateway stops accepting, closes connections, stops its providers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
