"""How decompute's values read in a notebook: sizes, prices, provider tables, status lines.

Shared by the magics, the cell runs and the panel so a provider or a task looks the same
everywhere. Pure formatting: nothing here talks to the network or touches widgets.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from notebook_ext.futures import Future


def format_bytes(n: float) -> str:
    """Binary units, as memory is sold (``2.0 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_prices(prices: dict) -> str:
    """Posted prices, tokens per unit-second; free resources are left out."""
    parts = [f"{k} {v:g}" for k, v in sorted(prices.items()) if v]
    return ", ".join(parts) or "free"


def format_runtime(runtime: dict) -> str:
    return f"py{runtime.get('python', '?')} cp{runtime.get('cloudpickle', '?')}"


class ProviderTable(list):
    """``%decompute providers``: a list of ProviderInfo that displays as a table."""

    HEAD = ("name", "id", "CPUs", "memory", "GPUs", "prices", "runtime", "sandbox", "reputation",
            "load")

    def _rows(self) -> list[tuple[str, ...]]:
        return [(p.name, p.id, str(p.cpus), format_bytes(p.memory), str(p.gpus),
                 format_prices(p.prices), format_runtime(p.runtime), p.sandbox,
                 f"{p.reputation:.2f}", f"{p.load.get('cpu_percent', 0.0):.0f}% cpu")
                for p in self]

    def __repr__(self) -> str:
        if not self:
            return "no providers online"
        rows = [self.HEAD, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEAD))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in rows)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self.HEAD)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in self._rows())
        return f"<table><tr>{head}</tr>{body}</table>" if self else "<i>no providers online</i>"


_COLOURS = {"finished": "green", "error": "red", "cancelled": "grey", "running": "orange"}


def status_bundle(fut: Future, elapsed: float | None, output: list[str],
                  note: str = "") -> dict[str, str]:
    """The status line (provider, elapsed, CPU, memory, cost) as text and HTML."""
    usage = fut.usage or {}
    parts = [fut.status, f"on {fut.provider}" if fut.provider else "waiting for a provider"]
    if elapsed is not None:
        parts.append(f"{elapsed:.1f} s")
    parts += [f"CPU {usage.get('cpu_seconds', 0.0):.2f} s",
              f"mem {format_bytes(usage.get('max_rss_bytes', 0.0))}",
              f"cost {fut.cost or 0.0:.6f}"]
    text = f"decompute {fut.key}: " + " · ".join(parts) + (f" · {note}" if note else "")
    colour = _COLOURS.get(fut.status, "orange")
    body = (f"<span style='color:{colour}'>●</span> <code>{html.escape(fut.key)}</code> "
            + html.escape(" · ".join(parts)) + (f" · {html.escape(note)}" if note else ""))
    if output:
        body += f"<pre style='margin:2px 0'>{html.escape(''.join(output))}</pre>"
    return {"text/plain": text + ("\n" + "".join(output) if output else ""), "text/html": body}


def task_html(rows: list[dict[str, Any]]) -> str:
    """The panel's task table: running tasks first, then the most recent finished ones."""
    if not rows:
        return "<i>no tasks yet</i>"
    head = "".join(f"<th style='text-align:left;padding-right:12px'>{c}</th>" for c in
                   ("task", "status", "provider", "elapsed", "CPU-s", "cost"))
    body = []
    for r in rows:
        colour = _COLOURS.get(r["status"], "black")
        body.append(
            f"<tr><td>{html.escape(r['key'][:40])}</td>"
            f"<td style='color:{colour}'>{r['status']}</td>"
            f"<td>{html.escape(r['provider'])}</td><td>{r['elapsed']:.1f} s</td>"
            f"<td>{r['cpu_seconds']:.2f}</td><td>{r['cost']:.6f}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
