"""``decompute-provider`` / ``python -m provider``: lend this machine's CPUs to a gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from gateway.units import parse_size
from provider.provider import DEFAULT_URL, Provider


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
    ap.add_argument("--name", help="a name shown to clients (default: host-pid)")
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
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if args.cpus is not None and args.cpus < 1:
        ap.error("--cpus must be at least 1")
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
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(provider.serve())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: provider._stop and provider._stop.set())
    await serving


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
    )
    asyncio.run(run(provider))


if __name__ == "__main__":
    main()
