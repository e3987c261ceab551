"""``decompute-provider`` / ``python -m provider``: lend this machine's CPUs to a gateway."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from gateway import protocol as p
from gateway.identity import Identity, decompute_home
from gateway.transport import handshake
from gateway.units import parse_size
from provider import stats
from provider.environments import (
    DEFAULT_QUOTA,
    Environments,
    default_envs_dir,
    environment_args_problem,
)
from provider.outbox import OUTPUT_LIMIT
from provider.provider import DEFAULT_URL, Provider
from provider.sandbox import HIDE_ENV

log = logging.getLogger(__name__)

#: Seconds --status waits for the gateway before it says it cannot reach it.
STATUS_TIMEOUT = 10.0


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="decompute-provider",
        description="Run a decompute provider: earn tokens by running other people's tasks in "
        "sandboxed processes on this machine. It dials out to the gateway; nothing dials in.",
    )
    ap.add_argument("url", nargs="?", default=os.environ.get("DECOMPUTE_GATEWAY", DEFAULT_URL),
                    help="gateway address (default: $DECOMPUTE_GATEWAY or %(default)s)")
    ap.add_argument("--name", help="a name shown to clients, bound to this account by the "
                    "gateway (default: this host's name and the account's first 6 hex digits)")
    ap.add_argument("--cpus", type=int, help="task slots (default: all; with --dask-scheduler, "
                    "the cluster's threads)")
    ap.add_argument("--memory", type=size_arg, help="memory offered, e.g. 4GiB (default: all)")
    ap.add_argument("--gpus", default="0", help="GPUs offered, or 'auto' to detect")
    ap.add_argument("--price-cpu", type=float, default=0.0, help="tokens per CPU-second")
    ap.add_argument("--price-memory", type=float, default=0.0, help="tokens per GiB-second")
    ap.add_argument("--price-gpu", type=float, default=0.0, help="tokens per GPU-second")
    ap.add_argument("--allow", action="append", default=[], metavar="ACCOUNT",
                    help="only run tasks of this account (repeatable; default: anyone)")
    ap.add_argument("--dask-scheduler", metavar="tcp://HOST:PORT",
                    help="front a Dask cluster instead of local worker processes")
    ap.add_argument("--output-limit", type=size_arg, default=OUTPUT_LIMIT, metavar="SIZE",
                    help="output kept per task, e.g. 1MiB (default); the rest is dropped and "
                    "the drop marked in the task's output")
    ap.add_argument("--store-memory", type=size_arg, metavar="SIZE",
                    help="bound of the store for scattered data, kept results and spare "
                         "memory files for the next blob (default: a quarter of --memory); "
                         "spares go first, then the least recently used entry")
    ap.add_argument("--status", action="store_true",
                    help="print this machine's account: balance, lifetime earnings and tasks "
                    "served, then exit")
    ap.add_argument("--hide", action="append", default=[], metavar="PATH",
                    help="a file or folder tasks must not see (repeatable); this provider's "
                    "key folder is always hidden")
    envs = ap.add_argument_group(
        "installing packages", "build a cached environment (wheels only: no package code runs "
        "while installing) for a task whose packages this machine lacks, outside the sandbox; "
        "the task then runs sandboxed against it and cannot write into it")
    envs.add_argument("--install-packages", action="store_true",
                      help="opt in: advertise that this provider installs packages")
    source = envs.add_mutually_exclusive_group()
    source.add_argument("--index-url", metavar="URL",
                        help="the package index to install from (default: pip's, PyPI)")
    source.add_argument("--find-links", metavar="DIR",
                        help="install only wheels from this folder (no index at all)")
    envs.add_argument("--envs-quota", type=size_arg, default=DEFAULT_QUOTA, metavar="SIZE",
                      help="disk the environments may take, e.g. 5GiB (default); the least "
                      "recently used unused ones are deleted past it")
    envs.add_argument("--envs-dir", metavar="DIR", default=default_envs_dir(),
                      help="where the environments live (default: %(default)s); tasks must be "
                      "able to reach it, so not under /tmp nor under the key folder")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    problem = environment_args_problem(args, hidden=[str(decompute_home()), *args.hide])
    if problem:
        ap.error(problem)
    if args.cpus is not None and args.cpus < 1:
        ap.error("--cpus must be at least 1")
    for path in args.hide:
        if not os.path.lexists(path):
            ap.error(f"--hide {path}: no such file or folder (a path to hide must exist now)")
    return args


def detect_gpus(spec: str) -> int:
    if spec != "auto":
        try:
            return int(spec)
        except ValueError:
            sys.exit(f"decompute-provider: --gpus takes a number or 'auto', not {spec!r}")
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])
    except (OSError, subprocess.SubprocessError):
        return 0


async def run(provider: Provider) -> None:
    """Serve until a signal. The first SIGINT/SIGTERM stops gracefully (running tasks are handed
    back to the gateway, which re-queues them); a second one kills the tasks and exits at once."""
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(provider.serve())
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print("decompute-provider: stopping; running tasks go back to the gateway (Ctrl-C "
                  "again to kill them now)", file=sys.stderr, flush=True)
            provider.request_stop()
        else:
            provider.kill_now()
            os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await serving


async def account_status(url: str, identity: Identity,
                         timeout: float = STATUS_TIMEOUT) -> dict[str, object]:
    """Balance and lifetime earnings of ``identity``'s account, asked as a client (a provider
    connection would be offered tasks)."""
    async with asyncio.timeout(timeout), connect(url, compression=None) as ws:
        await handshake(ws, identity, "client", session=f"status-{os.getpid()}")
        questions = {1: "balance", 2: "earnings"}
        for qid, what in questions.items():
            await ws.send(p.encode(p.Query(id=qid, what=what)))
        answers: dict[str, object] = {}
        while len(answers) < len(questions):
            msg, _ = p.decode(await ws.recv())
            if isinstance(msg, p.Reply) and msg.id in questions:
                if msg.error:
                    raise RuntimeError(f"the gateway refused the {questions[msg.id]} question: "
                                       f"{msg.error}")
                answers[questions[msg.id]] = msg.data
        return answers


def print_status(url: str) -> int:
    home = decompute_home()
    identity = Identity.load_or_create(home)
    try:
        answers = asyncio.run(account_status(url, identity))
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI,
            p.ProtocolError, RuntimeError) as exc:
        print(f"decompute-provider: cannot reach the gateway at {url} ({exc or type(exc).__name__})"
              f"; is it running? Pass its address as the first argument or set "
              f"$DECOMPUTE_GATEWAY.", file=sys.stderr)
        return 1
    balance = answers["balance"]
    if isinstance(balance, dict):
        balance_text = (f"{float(balance.get('available', 0.0)):.6f} tokens available, "
                        f"{float(balance.get('held', 0.0)):.6f} held")
    else:
        balance_text = f"{float(balance or 0.0):.6f} tokens"
    served = stats.load(home)
    print(f"account:          {identity.account}\n"
          f"gateway:          {url}\n"
          f"balance:          {balance_text}\n"
          f"earned, lifetime: {float(answers['earnings'] or 0.0):.6f} tokens\n"
          f"tasks served:     {served.tasks} ({served.cpu_seconds:.2f} CPU-s) by providers "
          f"using {home}")
    return 0


def environment_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """``Provider``'s ``environments`` argument for ``--install-packages`` (none without it)."""
    if not args.install_packages:
        return {}
    if "environments" not in inspect.signature(Provider).parameters:
        sys.exit("decompute-provider: --install-packages is not wired into this provider yet "
                 "(Provider takes no environments); run without it")
    try:
        envs = Environments(Path(args.envs_dir), index_url=args.index_url,
                            find_links=args.find_links, quota=args.envs_quota)
    except (OSError, ValueError) as exc:
        sys.exit(f"decompute-provider: cannot use --envs-dir {args.envs_dir}: {exc}")
    logging.getLogger(__name__).warning(
        "installing packages for tasks: wheels only from %s, into %s (quota %d MiB)",
        args.find_links or args.index_url or "pip's default index (PyPI)", envs.root,
        args.envs_quota >> 20)
    return {"environments": envs}


def raise_open_files_limit() -> None:
    """Take the hard limit on open files as ours: every blob held costs three descriptors (its
    memory file and the two mappings Python keeps a duplicate for), and a common soft limit is
    1,024. Task processes get their own limit in the sandbox."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %d to %d", soft, hard)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.status:
        sys.exit(print_status(args.url))
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    raise_open_files_limit()
    if args.hide:  # the sandbox hides these in every task's mount namespace
        os.environ[HIDE_ENV] = os.pathsep.join([*map(os.path.abspath, args.hide),
                                                os.environ.get(HIDE_ENV, "")])
    cpus, memory = args.cpus or os.cpu_count(), args.memory
    if args.dask_scheduler:
        from provider.dask_backend import dask_cluster_resources

        try:
            cores, cluster_memory = dask_cluster_resources(args.dask_scheduler)
        except (OSError, RuntimeError) as exc:
            sys.exit(f"decompute-provider: cannot use the Dask cluster at {args.dask_scheduler}: "
                     f"{exc}")
        cpus, memory = args.cpus or cores, args.memory or cluster_memory
    provider = Provider(
        args.url, name=args.name, cpus=cpus, memory=memory,
        gpus=detect_gpus(args.gpus), price_cpu=args.price_cpu, price_memory=args.price_memory,
        price_gpu=args.price_gpu, allow=args.allow, dask_scheduler=args.dask_scheduler,
        output_limit=args.output_limit, store_memory=args.store_memory,
        **environment_kwargs(args),
    )
    asyncio.run(run(provider))
    print(f"decompute-provider stopped. {provider.summary()}", flush=True)


if __name__ == "__main__":
    main()
