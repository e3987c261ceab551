"""``decompute-gateway`` / ``python -m gateway``: run a gateway, optionally with local providers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from gateway.hub import Hub
from gateway.identity import Identity, decompute_home
from gateway.server import DEFAULT_MAX_MESSAGE, GatewayServer

log = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="decompute-gateway",
        description="The decompute gateway: authenticates clients and providers, matches tasks "
        "to providers and relays their bytes (it never unpickles them).",
    )
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    ap.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    ap.add_argument("--db", default="decompute.sqlite", help="ledger database file (SQLite)")
    ap.add_argument("--faucet", type=float, default=0.0,
                    help="tokens credited once to each new account (development networks)")
    ap.add_argument("--fee-percent", type=float, default=0.0, help="gateway's cut of each payment")
    ap.add_argument("--local-providers", type=int, default=0, metavar="N",
                    help="start N providers beside the gateway (the embedded laptop setup)")
    ap.add_argument("--max-message-mib", type=int, default=DEFAULT_MAX_MESSAGE // 2**20,
                    help="largest websocket message accepted, MiB")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def start_local_providers(n: int, url: str, state_dir: Path) -> list[subprocess.Popen]:
    """N provider processes, each with its own identity under ``state_dir``."""
    procs = []
    cpus = max(1, (os.cpu_count() or 1) // max(n, 1))
    for i in range(n):
        env = dict(os.environ, DECOMPUTE_HOME=str(state_dir / f"local-{i}"))
        cmd = [sys.executable, "-m", "provider", url, "--name", f"local-{i}", "--cpus", str(cpus)]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(decompute_home(), name="gateway_ed25519")
    hub = Hub()
    server = GatewayServer(hub, identity, args.host, args.port, args.max_message_mib * 2**20)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    procs: list[subprocess.Popen] = []
    serving = asyncio.create_task(server.serve())
    try:
        started = asyncio.create_task(server.started.wait())
        await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # re-raise the bind error
        if args.local_providers:
            state = Path(args.db).resolve().parent / ".decompute-local"
            procs = start_local_providers(args.local_providers, server.url, state)
        await serving
    finally:
        stop_processes(procs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run(args))
    except OSError as exc:
        sys.exit(f"decompute-gateway: cannot listen on {args.host}:{args.port}: {exc}")


if __name__ == "__main__":
    main()
