"""Counters the gateway keeps, and their two renderings: ``/health`` (JSON) and ``/metrics``."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Counters:
    """Monotonic counters; gauges are read from the hub when rendering."""

    started: float = field(default_factory=time.time)
    tasks: Counter = field(default_factory=Counter)  # by final status
    submitted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    refused: Counter = field(default_factory=Counter)  # by error code
    connections: Counter = field(default_factory=Counter)  # by role
    #: Provider messages ignored because the sender was not assigned or asked (by reason).
    dropped: Counter = field(default_factory=Counter)


def render_prometheus(c: Counters, gauges: dict[str, float]) -> str:
    """Prometheus text exposition format, version 0.0.4."""
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP decompute_{name} {help_}")
        lines.append(f"# TYPE decompute_{name} {kind}")
        lines.extend(f"decompute_{name}{labels} {value}" for labels, value in samples)

    for name, value in gauges.items():
        metric(name, "gauge", name.replace("_", " "), [("", value)])
    metric("tasks_submitted_total", "counter", "tasks accepted", [("", c.submitted)])
    metric("tasks_completed_total", "counter", "tasks ended, by status",
           [(f'{{status="{k}"}}', v) for k, v in sorted(c.tasks.items())])
    metric("bytes_received_total", "counter", "websocket bytes received", [("", c.bytes_in)])
    metric("bytes_sent_total", "counter", "websocket bytes sent", [("", c.bytes_out)])
    metric("frames_refused_total", "counter", "frames or connections refused, by reason",
           [(f'{{code="{k}"}}', v) for k, v in sorted(c.refused.items())])
    metric("connections_total", "counter", "authenticated connections, by role",
           [(f'{{role="{k}"}}', v) for k, v in sorted(c.connections.items())])
    metric("dropped_total", "counter",
           "provider reports dropped: not from the provider assigned or asked, by reason",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(c.dropped.items())])
    metric("uptime_seconds", "gauge", "seconds since start", [("", time.time() - c.started)])
    return "\n".join(lines) + "\n"
