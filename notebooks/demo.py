"""`make demo`: a local decompute network, a real job through it, and what happened.

Starts a gateway with two sandboxed providers on loopback, runs work through them with the
public API, prints what happened (results, where they ran, cost, a verified receipt), and shuts
everything down.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.local import LocalNetwork  # noqa: E402
from notebook_ext import Client, as_completed, verify_receipt  # noqa: E402


def estimate_pi(samples: int, seed: int) -> float:
    rng = random.Random(seed)
    inside = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))
    return 4.0 * inside / samples


def column_stats(matrix):
    import numpy as np

    return {"mean": float(np.mean(matrix)), "std": float(np.std(matrix)), "pid": os.getpid()}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    print("decompute demo: starting a gateway with 2 local providers ...", flush=True)
    t0 = time.perf_counter()
    price = ["--local-price-cpu", "0.5"]  # providers charge 0.5 tokens per CPU-second
    with tempfile.TemporaryDirectory() as home, LocalNetwork(2, extra_args=price) as net:
        print(f"  gateway up at {net.url} in {time.perf_counter() - t0:.1f} s")
        with Client(net.url, home=home) as client:
            for p in client.providers():
                print(f"  provider {p.name}: {p.cpus} cpu, sandbox {p.sandbox}, "
                      f"runtime python {p.runtime['python']}")
            print(f"  account {client.account[:16]}..., balance {client.balance():,.2f} tokens")

            t = time.perf_counter()
            futures = client.map(estimate_pi, [200_000] * 8, range(8))
            where = {}
            for fut in as_completed(futures):
                where[fut.provider] = where.get(fut.provider, 0) + 1
            estimates = client.gather(futures)
            pi = sum(estimates) / len(estimates)
            print(f"\n  map: 8 Monte Carlo tasks -> pi ~ {pi:.5f} in "
                  f"{time.perf_counter() - t:.2f} s, spread over {where}")

            import numpy as np

            matrix = np.random.default_rng(0).normal(size=(2000, 2000))
            fut = client.submit(column_stats, matrix)
            stats = fut.result()
            print(f"  submit: 32 MB array -> mean {stats['mean']:+.4f}, std {stats['std']:.4f}"
                  f" (ran in provider pid {stats['pid']}, this process is {os.getpid()})")
            print(f"  usage {fut.usage.get('cpu_seconds', 0):.3f} cpu-s at 0.5 tokens/cpu-s: "
                  f"cost {fut.cost:.6f} tokens")
            ok = verify_receipt(fut.receipt, client.gateway_key)
            print(f"  receipt signed by the gateway: {'verified' if ok else 'INVALID'}")

            try:
                client.submit(lambda: 1 / 0).result()
            except ZeroDivisionError as exc:
                print(f"  a remote error comes back as itself: ZeroDivisionError({exc})")
            print(f"\n  balance now {client.balance():,.2f} tokens")
        print("shutting down ...")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
