"""``decompute-gateway`` / ``python -m gateway``: run a gateway, optionally with local providers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from gateway.billing import Billing
from gateway.hub import Hub
from gateway.identity import Identity, decompute_home
from gateway.ledger import Ledger, to_micro, to_tokens
from gateway.limits import Limits
from gateway.names import Names
from gateway.receipt_log import ReceiptLog
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
    ap.add_argument("--faucet", type=float, default=0.0, metavar="TOKENS",
                    help="development networks only: credit TOKENS to each new account, and "
                    "top a known account up to TOKENS again when it connects with a balance of "
                    "0 and nothing held (so a restart in the same folder leaves nobody at 0); "
                    "tasks that can only run on free providers need no tokens at all")
    ap.add_argument("--fee-percent", type=float, default=0.0, help="gateway's cut of each payment")
    ap.add_argument("--local-providers", type=int, default=0, metavar="N",
                    help="start N providers beside the gateway (the embedded laptop setup)")
    ap.add_argument("--local-price-cpu", type=float, default=0.0,
                    help="price (tokens per CPU-second) the local providers post")
    ap.add_argument("--default-escrow", type=float, default=1.0,
                    help="tokens held for a task that gives no budget= (nor max_price+timeout)")
    ap.add_argument("--spot-seed", type=int, default=None, metavar="N",
                    help="seed the spot-check draws (tests only: a seeded draw is predictable)")
    ap.add_argument("--lease-seconds", type=float, default=Limits().lease_seconds,
                    help="a provider must report each task it holds this often (in its "
                    "heartbeats), else the task is taken back and runs elsewhere")
    ap.add_argument("--cancel-grace", type=float, default=Limits().cancel_grace, metavar="SECONDS",
                    help="how long a provider has to confirm a cancel before its slot is freed")
    ap.add_argument("--rejoin-grace", type=float, default=Limits().rejoin_grace,
                    metavar="SECONDS", help="how long a task that no online provider can take "
                    "(after one left) waits for one to come back before it fails")
    ap.add_argument("--max-message-mib", type=int, default=DEFAULT_MAX_MESSAGE // 2**20,
                    help="largest websocket message accepted, MiB")
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


def start_local_providers(n: int, url: str, state_dir: Path, price_cpu: float = 0.0,
                          hide: list[Path] | None = None) -> list[subprocess.Popen]:
    """N provider processes, each with its own identity under ``state_dir`` and its share of
    this machine: cores and memory divided by N (together they never advertise more than it
    has)."""
    procs = []
    cpus = max(1, (os.cpu_count() or 1) // max(n, 1))
    memory = psutil.virtual_memory().total // max(n, 1)
    for i in range(n):
        home = state_dir / f"local-{i}"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = dict(os.environ, DECOMPUTE_HOME=str(home))
        if hide:  # the gateway's ledger and keys: tasks on these providers must not see them
            env["DECOMPUTE_HIDE"] = os.pathsep.join([*map(str, hide), os.environ.get(
                "DECOMPUTE_HIDE", "")])
        cmd = [sys.executable, "-m", "provider", url, "--name", f"local-{i}", "--cpus", str(cpus),
               "--memory", str(memory), "--price-cpu", str(price_cpu)]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


def local_state_dir() -> Path:
    """Where local providers keep their identities: under ``DECOMPUTE_HOME`` (never the current
    folder, where private keys would be left lying in a checkout)."""
    return decompute_home() / "local-providers"


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


def mint(argv: list[str]) -> None:
    """``decompute-gateway mint ACCOUNT AMOUNT [--db FILE]``: an operator credits an account.

    Only a full account id (64 hex digits, as ``client.account`` shows it) of an account this
    gateway's ledger already knows is accepted: a typo or a shortened id must never create
    tokens for an account nobody holds the key of.
    """
    ap = argparse.ArgumentParser(prog="decompute-gateway mint",
                                 description="Credit ACCOUNT with AMOUNT new tokens.")
    ap.add_argument("account", help="the full account id: 64 hex digits (client.account)")
    ap.add_argument("amount", type=float, help="tokens to create")
    ap.add_argument("--db", default="decompute.sqlite", help="the gateway's ledger file")
    args = ap.parse_args(argv)
    account = args.account.strip().lower()
    if len(account) != 64 or any(c not in "0123456789abcdef" for c in account):
        ap.error(f"ACCOUNT must be a full account id of 64 hex digits (client.account prints "
                 f"it), not {args.account!r}")
    if not math.isfinite(args.amount) or args.amount <= 0:
        ap.error("AMOUNT must be a positive number of tokens")
    if not Path(args.db).exists():
        ap.error(f"no ledger at {args.db}; pass the gateway's --db FILE")
    with Ledger(args.db) as ledger:
        if not ledger.known(account):
            ap.error(f"account {account} is unknown to the ledger {args.db}: it has never "
                     f"connected to this gateway. Connect once (Client(...) or a provider), "
                     f"then mint")
        ledger.mint(account, to_micro(args.amount), reason="operator mint")
        balance = to_tokens(ledger.balance(account))
    print(f"minted {args.amount:g} tokens to {account}; balance now {balance:g}")


def raise_open_files_limit() -> None:
    """One file descriptor per connection: lift the soft limit to the hard one, so a gateway
    serving a thousand providers does not refuse connections at the common default of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> None:
    # The gateway holds one object graph per task (100,000s of them under load): collect young
    # garbage less often, so that full collections do not walk them all every few ms.
    gc.set_threshold(50_000, 20, 100)
    raise_open_files_limit()
    identity = Identity.load_or_create(decompute_home(), name="gateway_ed25519")
    ledger = Ledger(args.db, faucet_micro=to_micro(args.faucet), fee_percent=args.fee_percent)
    refunded = ledger.recover()
    if refunded:
        log.warning("refunded %d escrows of tasks lost in the last shutdown", len(refunded))
    ledger.check()
    names = Names(args.db)  # provider names' owners, beside the ledger in its database
    limits = Limits(lease_seconds=args.lease_seconds, cancel_grace=args.cancel_grace,
                    rejoin_grace=args.rejoin_grace, no_provider_wait=2 * args.rejoin_grace)
    receipt_log = ReceiptLog(args.db)  # the public log of settlements, beside the ledger
    if receipt_log.size():  # leaves committed just before a crash are covered at once
        receipt_log.sign_head(identity)
    hub = Hub(Billing(ledger, identity, default_escrow=args.default_escrow,
                      receipt_log=receipt_log), limits, names=names,
              spot_rng=None if args.spot_seed is None else random.Random(args.spot_seed))
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
            db = Path(args.db).resolve()
            hide = [decompute_home(), *(db.with_name(db.name + x) for x in ("", "-wal", "-shm"))]
            procs = start_local_providers(args.local_providers, server.url, local_state_dir(),
                                          args.local_price_cpu, hide=hide)
        await serving
    finally:
        stop_processes(procs)
        names.close()
        receipt_log.close()
        ledger.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mint"]:
        mint(argv[1:])
        return
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(run(args))
    except OSError as exc:
        sys.exit(f"decompute-gateway: cannot listen on {args.host}:{args.port}: {exc}")


if __name__ == "__main__":
    main()
