"""What a volunteer's providers have served, across runs: ``$DECOMPUTE_HOME/provider-stats.json``.

The gateway keeps the money (lifetime earnings come from its ledger); how many tasks this machine
served and the CPU time it gave are counted here, by the providers themselves, so that
``decompute-provider --status`` can show them. Several providers may share one home: each adds its
increments under an exclusive lock, so no count is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATS_FILE = "provider-stats.json"


@dataclass(slots=True)
class Served:
    tasks: int = 0
    cpu_seconds: float = 0.0


def load(home: str | os.PathLike) -> Served:
    """The lifetime totals kept in ``home`` (zero when there are none, or they are unreadable)."""
    try:
        data = json.loads((Path(home) / STATS_FILE).read_text())
        return Served(int(data.get("tasks_served", 0)), float(data.get("cpu_seconds", 0.0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return Served()


def add(home: str | os.PathLike, tasks: int, cpu_seconds: float) -> None:
    """Add an increment to the lifetime totals (atomically: lock, read, write, rename)."""
    if not tasks and not cpu_seconds:
        return
    path = Path(home) / STATS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        with open(Path(home) / (STATS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = load(home)
            tmp.write_text(json.dumps({"tasks_served": now.tasks + tasks,
                                       "cpu_seconds": round(now.cpu_seconds + cpu_seconds, 6)}))
            os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record tasks served in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
