"""The panel's HTML: header, provider rows and task-group rows, sized for a 300 px sidebar.

Pure rendering (strings in, HTML out): no widgets, no network, so every state the panel can be
in is testable without a browser. The layout is one line per provider and two per task group at
300 px; a container query reveals more detail (CPUs, memory, runtime, full prices) when the panel
is wide. Everything else is on hover (``title`` attributes). Colours use JupyterLab's theme
variables with light fallbacks, so the panel reads in dark themes too.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from notebook_ext.display import format_bytes, format_prices, format_runtime, format_tokens
from notebook_ext.requirements import format_packages

#: Connection states as ``client.status`` names them, with the pill's colour and words.
PILLS = {
    "connecting": ("#b26a00", "connecting"),
    "connected": ("#1e7e34", "connected"),
    "reconnecting": ("#b26a00", "reconnecting"),
    "lost": ("#c62828", "lost"),
    "closed": ("#616161", "closed"),
}

CSS = """<style>
.dc-panel { container-type: inline-size; font-size: 12px; line-height: 1.35;
  color: var(--jp-ui-font-color1, #222); padding: 4px 6px; box-sizing: border-box; }
.dc-panel .widget-html-content { line-height: 1.35; font-size: 12px; }
.dc-panel .widget-html, .dc-panel .widget-checkbox { margin: 0; height: auto; }
.dc-panel .widget-html, .dc-panel .widget-html-content { min-width: 0; overflow: hidden; }
.dc-panel .widget-checkbox { width: 18px !important; min-width: 18px; }
.dc-panel .widget-checkbox input { margin: 0 2px 0 0; }
.dc-panel .widget-hbox { align-items: center; }
.dc-panel .widget-button { height: 22px; line-height: 20px; padding: 0 6px; font-size: 11px;
  margin: 0 0 0 4px; }
.dc-head { display: flex; align-items: center; gap: 6px; flex-wrap: wrap; }
.dc-title { font-weight: 600; font-size: 13px; }
.dc-pill { border-radius: 9px; padding: 0 8px; color: #fff; font-size: 11px; font-weight: 600;
  white-space: nowrap; }
.dc-sub { color: var(--jp-ui-font-color2, #666); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.dc-balance { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.dc-balance b { font-size: 13px; }
.dc-section { margin-top: 6px; font-weight: 600; color: var(--jp-ui-font-color2, #555);
  border-bottom: 1px solid var(--jp-border-color2, #ddd); white-space: nowrap; }
.dc-row { display: flex; align-items: center; gap: 5px; white-space: nowrap; min-width: 0; }
.dc-name { flex: 1 1 auto; min-width: 30px; overflow: hidden; text-overflow: ellipsis;
  font-weight: 600; }
.dc-price { flex: 0 0 auto; color: var(--jp-ui-font-color2, #555); }
.dc-spark { flex: 0 0 auto; vertical-align: middle; }
.dc-badge { flex: 0 0 auto; border-radius: 3px; padding: 0 4px; font-size: 10px;
  border: 1px solid currentColor; }
.dc-strong { color: #1e7e34; } .dc-weak { color: #b26a00; } .dc-gone { color: #c62828; }
.dc-offline .dc-name, .dc-offline .dc-price { opacity: 0.5; }
.dc-rep { color: var(--jp-ui-font-color2, #555); }
.dc-wide { display: none; color: var(--jp-ui-font-color2, #666); }
.dc-group { min-width: 0; }
.dc-gname { flex: 1 1 auto; min-width: 30px; overflow: hidden; text-overflow: ellipsis;
  font-family: var(--jp-code-font-family, monospace); }
.dc-gcount { flex: 0 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis;
  color: var(--jp-ui-font-color2, #555); }
.dc-gcost { flex: 0 0 auto; color: var(--jp-ui-font-color2, #555); }
.dc-bar { height: 5px; background: var(--jp-layout-color3, #e0e0e0); border-radius: 3px;
  overflow: hidden; display: flex; margin-top: 1px; }
.dc-bar span { display: block; height: 5px; }
.dc-foot { color: var(--jp-ui-font-color2, #666); margin-top: 4px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.dc-off .dc-dim, .dc-off .dc-balance, .dc-off .dc-sub { opacity: 0.45; filter: grayscale(1); }
.dc-empty { color: var(--jp-ui-font-color2, #777); font-style: italic; }
@container (min-width: 560px) {
  .dc-wide { display: inline; flex: 1 1 auto; overflow: hidden; text-overflow: ellipsis; }
  .dc-row .dc-name { flex: 0 0 140px; }
  .dc-panel, .dc-panel .widget-html-content { font-size: 13px; }
}
</style>"""


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


def header_html(status: str, gateway: str, account: str, available: float | None,
                held: float | None, note: str = "") -> str:
    """Title and connection pill, the balance (available and held), gateway and account."""
    colour, words = PILLS.get(status, ("#616161", status))
    if available is None:
        balance = "balance <b>—</b>"
    else:
        balance = f"<b>{format_tokens(available)}</b> tokens available"
        if held is not None:
            balance += f" · <b>{format_tokens(held)}</b> held"
    hover = (f"tokens you can spend now; 'held' is escrow reserved by your running tasks "
             f"(refunded when they end){' — ' + note if note else ''}")
    short = f"{account[:8]}…" if account else "?"
    return (f"<div class='dc-head'><span class='dc-title'>decompute</span>"
            f"<span class='dc-pill dc-pill-{_attr(status)}' style='background:{colour}'"
            f" title='{_attr(note or words)}'>{html.escape(words)}</span></div>"
            f"<div class='dc-balance' title='{_attr(hover)}'>{balance}</div>"
            f"<div class='dc-sub' title='gateway {_attr(gateway)} · account {_attr(account)}'>"
            f"{html.escape(gateway)} · {html.escape(short)}</div>")


def sparkline(values: Sequence[float], width: int = 40, height: int = 12,
              colour: str = "#2e86c1") -> str:
    """An inline SVG of recent 0..1 values (oldest left), with the latest as a filled area."""
    if not values:
        values = [0.0]
    pts = list(values)[-20:]
    step = width / max(len(pts) - 1, 1)
    coords = [(i * step, height - 1 - v * (height - 2)) for i, v in enumerate(pts)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    area = f"0,{height} {line} {coords[-1][0]:.1f},{height}"
    return (f"<svg class='dc-spark' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' aria-hidden='true'>"
            f"<rect width='{width}' height='{height}' fill='var(--jp-layout-color2, #f0f0f0)'/>"
            f"<polygon points='{area}' fill='{colour}' fill-opacity='0.25'/>"
            f"<polyline points='{line}' fill='none' stroke='{colour}' stroke-width='1.2'/></svg>")


@dataclass(frozen=True, slots=True)
class ProviderView:
    """What one provider row shows (the panel builds it from ``ProviderInfo``)."""

    id: str
    name: str
    cpus: int
    memory: int
    gpus: int
    prices: dict
    runtime: dict
    sandbox: str
    reputation: float
    running: int
    cpu_busy: float  # cores busy with this provider's own tasks
    memory_used: float  # bytes of its task processes
    account: str = ""
    packages: dict = field(default_factory=dict)  # notable ones: name -> version
    installs: bool = False  # builds environments for packages it lacks


def provider_html(p: ProviderView, history: Sequence[float], offline: bool = False) -> str:
    """One line: name, price, own-load sparkline, sandbox and reputation badges (+ wide
    details); the whole offer on hover. ``offline``: it left and is still checked."""
    strong = p.sandbox == "strong"
    hover = (f"{p.name} ({p.id})\naccount {p.account}\n{p.cpus} CPU · "
             f"{format_bytes(p.memory)} · {p.gpus} GPU\nprices (tokens per unit-second): "
             f"{format_prices(p.prices)}\nits tasks now: {p.cpu_busy:.1f} cores busy, "
             f"{format_bytes(p.memory_used)}, {p.running} running\n"
             f"runtime {format_runtime(p.runtime)}\n"
             f"packages {format_packages(p.packages, p.installs, limit=20)}\nsandbox {p.sandbox}"
             f"{'' if strong else ' (no namespaces: pin strong providers for untrusted data)'}"
             f"\nreputation {p.reputation:.2f}")
    price = format_tokens(p.prices.get("cpu", 0.0)) if any(p.prices.values()) else "free"
    unit = "/cpu·s" if any(p.prices.values()) else ""
    if offline:
        hover = ("offline: still checked, it keeps its id if it reconnects (uncheck to stop "
                 "waiting for it)\n" + hover)
    load = "<span class='dc-badge dc-gone'>offline</span>" if offline else sparkline(history)
    return (f"<div class='dc-row{' dc-offline' if offline else ''}' title='{_attr(hover)}'>"
            f"<span class='dc-name'>{html.escape(p.name)}</span>"
            f"<span class='dc-price'>{price}{unit}</span>"
            f"{load}"
            f"<span class='dc-wide'>{p.cpu_busy:.1f}/{p.cpus} cpu · {p.cpus} CPU · "
            f"{format_bytes(p.memory)} · {html.escape(format_runtime(p.runtime))}</span>"
            f"<span class='dc-badge {'dc-strong' if strong else 'dc-weak'}'>"
            f"{html.escape(p.sandbox)}</span>"
            f"<span class='dc-rep'>★{p.reputation:.2f}</span></div>")


@dataclass(frozen=True, slots=True)
class GroupView:
    """What one task-group row shows."""

    name: str
    total: int
    finished: int
    failed: int
    cancelled: int
    running: int
    cost: float
    cpu_seconds: float
    elapsed: float
    providers: tuple[str, ...] = ()

    @property
    def done(self) -> int:
        return self.finished + self.failed + self.cancelled

    @property
    def active(self) -> bool:
        return self.done < self.total

    @property
    def status(self) -> str:
        if self.active:
            return "running" if self.running else "waiting"
        if self.failed:
            return "failed"
        return "cancelled" if self.cancelled and not self.finished else "done"


def group_html(g: GroupView) -> str:
    """Name, done/total and cost on one line; a stacked bar (finished, failed, cancelled,
    running) below; counts, CPU-s, time and providers on hover."""
    total = max(g.total, 1)
    parts = [("#2e7d32", g.finished), ("#c62828", g.failed), ("#9e9e9e", g.cancelled),
             ("#90caf9", g.running)]
    bar = "".join(f"<span style='width:{100 * n / total:.1f}%;background:{c}'></span>"
                  for c, n in parts if n)
    counts = f"{g.done}/{g.total}"
    if g.running:
        counts += f" · {g.running} running"
    elif g.active:
        counts += " · queued"
    if g.failed:
        counts += f" · {g.failed} failed"
    if g.cancelled:
        counts += f" · {g.cancelled} cancelled"
    where = ", ".join(g.providers[:4]) + (" …" if len(g.providers) > 4 else "")
    hover = (f"{g.name}: {g.total} tasks — {g.finished} finished, {g.failed} failed, "
             f"{g.cancelled} cancelled, {g.running} running\n{g.cpu_seconds:.2f} CPU-s · "
             f"{format_tokens(g.cost)} tokens · {g.elapsed:.1f} s"
             + (f"\non {where}" if where else ""))
    return (f"<div class='dc-group' title='{_attr(hover)}'><div class='dc-row'>"
            f"<span class='dc-gname'>{html.escape(g.name)}</span>"
            f"<span class='dc-gcount'>{html.escape(counts)}</span>"
            f"<span class='dc-gcost'>{format_tokens(g.cost)} tok</span></div>"
            f"<div class='dc-bar'>{bar}</div></div>")


def footer_html(submitted: int, spent: float, groups_hidden: int) -> str:
    more = f" · {groups_hidden} older groups not shown" if groups_hidden else ""
    return (f"<div class='dc-foot'>session: {submitted} tasks · {format_tokens(spent)} tokens "
            f"spent{more}</div>")


def providing_html(stats: dict) -> str:
    """What this kernel earns as a provider (``%decompute provide``)."""
    return (f"<div class='dc-section'>providing</div><div class='dc-row' "
            f"title='{_attr(str(stats.get('id', '')))}'><span class='dc-name'>"
            f"{html.escape(str(stats['name']))}</span><span class='dc-price'>"
            f"{stats['served']} served · {stats['cpu_seconds']:.1f} CPU-s · "
            f"{format_tokens(stats['earnings'])} earned</span></div>")
