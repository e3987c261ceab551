"""What the panel and the status lines show, as pure functions (no network, no widgets, no
browser): token amounts, task-group names, the header in every connection state, provider rows
from old and new load reports, task-group rows.
"""

from __future__ import annotations

import re

import pytest

from notebook_ext import panel_view as pv
from notebook_ext.client import ProviderInfo
from notebook_ext.display import ProviderTable, format_tokens, task_group


@pytest.mark.parametrize(("amount", "shown"), [
    (0, "0"), (12.5, "12.5"), (3.0, "3"), (0.0123456, "0.0123"), (0.000001, "0.000001"),
    (987.654, "988"), (999.9999, "1,000"), (12345.6, "12,346"), (1_000_000, "1,000,000"),
    (-2.5, "-2.5"), (None, "—"),
])
def test_tokens_show_three_significant_digits_never_six_decimals(amount, shown) -> None:
    assert format_tokens(amount) == shown


@pytest.mark.parametrize(("key", "group"), [
    ("cell-In18-0a1b2c3d4e", "In[18]"),
    ('["sum-aggregate-0a1b2c3d4e5f60718293a4b5c6d7e8f9",0]#1f2e3d4c', "sum-aggregate"),
    ('"abs-6c1e0b1a-2b3c-4d5e-8f9a-0123456789ab"#1f2e3d4c', "abs"),
    ('[["x",1],2]#t', "x"),
    ("~rechunk-merge~0f1e2d3c4b5a69788796a5b4c3d2e1f0#t", "rechunk-merge"),
    ("square-3fa2b11cd0e1-5", "square"),  # a map's key
    ("square-0a1b2c3d4e5f60718293a4b5c6d7e8f9", "square"),  # a submit's key
    ("finalize-hlgfinalizecompute-0a1b2c3d4e5f60718293a4b5c6d7e8f9",
     "finalize-hlgfinalizecompute"),
    ("my-own-key", "my-own-key"),
])
def test_task_groups_read_as_a_person_names_them(key, group) -> None:
    assert task_group(key) == group


@pytest.mark.parametrize(("status", "colour"), [
    ("connected", "#1e7e34"), ("reconnecting", "#b26a00"), ("lost", "#c62828"),
    ("connecting", "#b26a00"), ("closed", "#616161"),
])
def test_the_pill_says_the_state_in_its_colour(status, colour) -> None:
    head = pv.header_html(status, "ws://127.0.0.1:1", "ab" * 32, 995.123456, 4.5)
    pill = re.search(r"<span class='dc-pill[^>]*>([^<]*)</span>", head)
    assert pill and pill.group(1) == status and colour in pill.group(0)
    assert "<b>995</b> tokens available · <b>4.5</b> held" in head
    assert "abababab…" in head and "ab" * 32 in head  # short id shown, the full one on hover


def test_a_plain_float_balance_shows_without_held() -> None:
    head = pv.header_html("connected", "ws://h:1", "a" * 64, 7.0, None)
    assert "<b>7</b> tokens available" in head and "held" not in head.split("title")[0]
    assert "balance <b>—</b>" in pv.header_html("connected", "ws://h:1", "a" * 64, None, None)


def info(load: dict, **kw) -> ProviderInfo:
    base = dict(id="p0-abcdef12", name="p0", cpus=4, memory=8 << 30, gpus=0,
                prices={"cpu": 0.5, "memory": 0.0}, runtime={"python": "3.11"},
                sandbox="strong", load=load, reputation=0.75, account="c" * 64)
    return ProviderInfo(**{**base, **kw})


def test_a_provider_row_shows_its_own_load_and_badges() -> None:
    from notebook_ext.panel import provider_view

    view = provider_view(info({"cpu": 1.0, "memory_bytes": 2 << 30, "running": 1}))
    assert (view.cpu_busy, view.memory_used, view.running) == (1.0, 2 << 30, 1)
    row = pv.provider_html(view, [0.0, 0.25])
    assert "0.5/cpu·s" in row and ">strong<" in row and "★0.75" in row
    assert "1.0 cores busy" in row and "2.0 GiB" in row  # the hover text
    assert "<svg" in row
    older = provider_view(info({"cpu_percent": 50.0, "memory_percent": 25.0}))
    assert older.cpu_busy == 2.0 and older.memory_used == 2 << 30
    free = pv.provider_html(provider_view(info({}, prices={}, sandbox="weak")), [])
    assert ">free<" in free and "dc-weak" in free


def test_the_providers_table_shows_own_load() -> None:
    table = repr(ProviderTable([info({"cpu": 1.5, "memory_bytes": 0, "running": 2})]))
    assert "1.5/4 cpu busy" in table


def test_a_group_row_counts_and_costs() -> None:
    g = pv.GroupView("napper", total=4, finished=1, failed=0, cancelled=2, running=1,
                     cost=0.0123456, cpu_seconds=2.5, elapsed=3.0, providers=("p0-1",))
    assert g.active and g.status == "running"
    row = pv.group_html(g)
    assert ">napper<" in row and "3/4 · 1 running · 2 cancelled" in row
    assert "0.0123 tok" in row and "on p0-1" in row
    assert "0/1 · queued" in pv.group_html(pv.GroupView("In[6]", 1, 0, 0, 0, 0, 0, 0, 1.0))
    done = pv.GroupView("abs", 6, 6, 0, 0, 0, 0.2, 0.1, 1.0)
    assert done.status == "done" and not done.active
    gone = pv.GroupView("nap", 2, 0, 0, 2, 0, 0.0, 0.0, 1.0)
    assert gone.status == "cancelled"
    assert pv.GroupView("f", 2, 1, 1, 0, 0, 0.0, 0.0, 1.0).status == "failed"
