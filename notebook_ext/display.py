"""How decompute's values read in a notebook: sizes, tokens, task names, status lines.

Shared by the magics, the cell runs and the panel so a provider or a task looks the same
everywhere. Pure formatting: nothing here talks to the network or touches widgets.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import TYPE_CHECKING, Any

from notebook_ext.requirements import format_packages

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


def format_tokens(amount: float | None) -> str:
    """Tokens to three significant digits (``0.0123``, ``12.5``, ``988``), never six decimals:
    the ledger counts micro-tokens, but a reader compares magnitudes. Thousands keep every
    integer digit (``12,346``) so a balance never looks rounded away."""
    if amount is None:
        return "—"
    value = float(amount)
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    if abs(round(value, decimals)) >= 1000:  # 999.9999 rounds up into the thousands
        return f"{value:,.0f}"
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_price(prices: dict) -> str:
    """The CPU price in a few characters for a narrow row (``0.5/cpu·s``); ``free`` if none."""
    if not any(prices.values()):
        return "free"
    cpu = prices.get("cpu", 0.0)
    if cpu:
        return f"{format_tokens(cpu)}/cpu·s"
    unit, value = next((k, v) for k, v in sorted(prices.items()) if v)
    return f"{format_tokens(value)}/{unit}·s"


_CELL_KEY = re.compile(r"^cell-In(\d+)-[0-9a-f]+$")
_TOKEN_WORD = re.compile(r"^[a-f]{8}$")


def key_split(key: Any) -> str:
    """Dask's ``key_split`` without importing Dask: the group a key belongs to
    (``('sum-aggregate-8f3a…', 0)`` -> ``sum-aggregate``, ``inc-<uuid>`` -> ``inc``)."""
    if isinstance(key, (list, tuple)):
        key = key[0] if key else ""
    if isinstance(key, bytes):
        key = key.decode(errors="replace")
    text = str(key)
    if not text:
        return "task"
    words = text.split("-")
    if words[0][:1].isalpha():
        result = words[0]
    else:
        result = words[0].split(",")[0].strip("_'()\"[]") or "task"
    for word in words[1:]:
        if word.isalpha() and not _TOKEN_WORD.match(word):
            result += "-" + word
        else:
            break
    if len(result) == 32 and re.fullmatch(r"[a-f0-9]{32}", result):
        return "data"
    if result.startswith("<"):
        result = result.strip("<>").split()[0].split(".")[-1]
    return result


def task_group(key: str) -> str:
    """What a person calls the task with wire key ``key``: ``In[18]`` for a ``%%decompute``
    cell, the Dask key's prefix for a graph task (its wire key is the key's JSON, ``#`` and a
    token), the function's name for ``submit``/``map``."""
    cell = _CELL_KEY.match(key)
    if cell:
        return f"In[{cell.group(1)}]"
    text, sep, _token = key.rpartition("#")
    if sep and text.startswith("~"):  # a long Dask key, named by a hash: "~prefix~digest"
        return text[1:].split("~", 1)[0] or "task"
    if sep and text[:1] in "[\"":
        try:
            return key_split(json.loads(text))
        except ValueError:
            pass
    return key_split(key)


def format_runtime(runtime: dict) -> str:
    return f"py{runtime.get('python', '?')} cp{runtime.get('cloudpickle', '?')}"


def load_fractions(load: dict, cpus: int, memory: int) -> tuple[float, float]:
    """(CPU, memory) busy fractions, 0..1, of the provider's *own* task processes:
    ``{"cpu": cores busy, "memory_bytes": ...}``; older gateways sent host-wide percentages."""
    if "cpu" in load:
        cpu = float(load.get("cpu") or 0.0) / max(cpus, 1)
    else:
        cpu = float(load.get("cpu_percent") or 0.0) / 100
    if "memory_bytes" in load:
        mem = float(load.get("memory_bytes") or 0.0) / max(memory, 1)
    else:
        mem = float(load.get("memory_percent") or 0.0) / 100
    return min(max(cpu, 0.0), 1.0), min(max(mem, 0.0), 1.0)


def format_load(load: dict, cpus: int) -> str:
    """``0.4/2 cpu busy`` from the provider's own task processes (older gateways: a percent)."""
    if "cpu" in load:
        return f"{float(load.get('cpu') or 0.0):.1f}/{cpus} cpu busy"
    return f"{float(load.get('cpu_percent') or 0.0):.0f}% cpu"


class ProviderTable(list):
    """``%decompute providers``: a list of ProviderInfo that displays as a table."""

    HEAD = ("name", "id", "CPUs", "memory", "GPUs", "prices", "runtime", "packages", "sandbox",
            "reputation", "load")

    def _rows(self) -> list[tuple[str, ...]]:
        return [(p.name, p.id, str(p.cpus), format_bytes(p.memory), str(p.gpus),
                 format_prices(p.prices), format_runtime(p.runtime),
                 format_packages(p.packages, p.installs), p.sandbox,
                 f"{p.reputation:.2f}", format_load(p.load, p.cpus))
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
              f"cost {format_tokens(fut.cost or 0.0)}"]
    name = task_group(fut.key)
    text = f"decompute {name}: " + " · ".join(parts) + (f" · {note}" if note else "")
    colour = _COLOURS.get(fut.status, "orange")
    body = (f"<span style='color:{colour}'>●</span> <code title='task key "
            f"{html.escape(fut.key, quote=True)}'>{html.escape(name)}</code> "
            + html.escape(" · ".join(parts)) + (f" · {html.escape(note)}" if note else ""))
    if output:
        body += f"<pre style='margin:2px 0'>{html.escape(''.join(output))}</pre>"
    return {"text/plain": text + ("\n" + "".join(output) if output else ""), "text/html": body}
