"""The widget panel in a real kernel (issue 5 item 5, issue 10): its widgets are read from the
kernel, against a real gateway and real priced providers.

The test acts as the front end would: it reads widget values and sets a checkbox's ``value`` or
clicks a button (exactly what a click sends over the comm), then checks what the kernel and the
gateway do with it. The browser itself is driven in ``test_panel_browser.py``.
"""

from __future__ import annotations

import json

from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture, wait_for

READ = "print(json.dumps(panel.state()))"


def open_panel(k: Kernel) -> None:
    """``%decompute panel`` in the kernel; the panel is then ``panel`` there."""
    k.run("import json\nimport notebook_ext.magics as _m")
    ex = k.run("%decompute panel")
    assert "right sidebar" in ex.stream()  # sidecar is installed in the dev extras
    k.run("panel = _m._magics.panel")


net = network_fixture("panel")
kernel = kernel_fixture("panel", open_panel)


def read(kernel: Kernel) -> dict:
    return kernel.json(READ)


def group(kernel: Kernel, name: str) -> dict | None:
    return next((g for g in read(kernel)["groups"] if g["group"] == name), None)


def test_panel_shows_the_connection_balance_and_live_providers(kernel: Kernel,
                                                               net: Network) -> None:
    state = wait_for(lambda: (s := read(kernel))["balance"]["available"] is not None and s, 15,
                     "the panel's balance")
    assert state["status"] == "connected" and state["updating"] is True
    assert state["greyed"] is False
    assert state["gateway"] == net.url
    assert sorted(p["name"] for p in state["providers"]) == sorted(net.health()["provider_names"])
    row = state["providers"][0]
    assert row["cpus"] == 1 and row["prices"]["cpu"] == 1.0 and row["sandbox"]
    assert 0 <= row["cpu_busy"] <= row["cpus"]  # its own tasks' cores, not the host's load
    assert state["balance"]["available"] > 0 and state["balance"]["held"] is not None
    html = kernel.json("print(json.dumps(panel.header.value))")
    assert "tokens available" in html and "held" in html and "connected" in html
    assert "0.000000" not in html  # tokens in three significant digits, never six decimals


def test_a_providers_load_is_its_own_tasks(kernel: Kernel) -> None:
    kernel.run("def spin(seconds):\n    import time\n    end = time.monotonic() + seconds\n"
               "    while time.monotonic() < end:\n        pass\n"
               "_p0 = next(r.id for r in panel.provider_rows.values() if r.name == 'p0')\n"
               "_spin = _m.get_client().submit(spin, 20, providers=[_p0])")

    def busy() -> dict | None:  # the host may be loaded: any share of a core will do
        rows = {p["name"]: p for p in read(kernel)["providers"]}
        return rows if rows["p0"]["cpu_busy"] > 0.05 and rows["p0"]["running"] else None

    rows = wait_for(busy, 20, "p0's load to show its busy task", interval=0.2)
    assert rows["p0"]["memory_used"] > 0 and rows["p0"]["load_history"][-1] > 0
    # an idle provider beside it shows none of it (not the host's load, the same for all)
    assert rows["p1"]["cpu_busy"] == 0 and rows["p1"]["running"] == 0, rows
    kernel.run("_spin.cancel()")
    wait_for(lambda: not any(p["running"] for p in read(kernel)["providers"]), 20,
             "the spin to end", interval=0.2)


def test_checking_a_provider_sends_the_next_cells_there(kernel: Kernel) -> None:
    kernel.run("_row = next(r for r in panel.provider_rows.values() if r.name == 'p1')\n"
               "_row.check.value = True")
    state = read(kernel)
    p1 = next(p["id"] for p in state["providers"] if p["name"] == "p1")
    assert state["selected"] == [p1]
    assert kernel.json("print(json.dumps(_m.get_client().default_providers))") == [p1]
    for _ in range(3):
        kernel.run("%%decompute\nimport os\nos.getpid()")
        assert kernel.json("print(json.dumps(_m._magics.last_future.provider))") == p1
    kernel.run("_row.check.value = False")
    assert kernel.json("print(json.dumps(_m.get_client().default_providers))") is None


def test_a_cell_shows_as_its_prompt_with_its_cost(kernel: Kernel) -> None:
    before = read(kernel)
    ex = kernel.run("%%decompute\nimport time\n_t = time.process_time()\n"
                    "while time.process_time() - _t < 0.3:\n    pass")
    count = ex.reply["content"]["execution_count"]

    def cell_group() -> dict | None:
        g = group(kernel, f"In[{count}]")
        return g if g and g["status"] == "done" and g["cost"] > 0 else None

    g = wait_for(cell_group, 15, f"the panel to show In[{count}] done with its cost",
                 interval=0.2)
    assert (g["done"], g["total"]) == (1, 1)
    row = next(t for t in read(kernel)["tasks"] if t["group"] == f"In[{count}]")
    assert row["provider"] and row["cpu_seconds"] > 0
    def total(state: dict) -> float:  # what the account owns: spendable and in escrow
        return state["balance"]["available"] + state["balance"]["held"]

    after = wait_for(lambda: total(s := read(kernel)) < total(before) and s, 15,
                     "the balance to go down", interval=0.2)
    assert after["totals"]["tasks"] > before["totals"]["tasks"]
    assert after["totals"]["tokens"] > before["totals"]["tokens"]


def test_a_dask_graph_shows_its_progress_by_task_group(kernel: Kernel) -> None:
    kernel.run("import dask\n"
               "_parts = [dask.delayed(abs)(-i) for i in range(6)]\n"
               "_total = dask.delayed(sum)(_parts)\n"
               "_answer = _total.compute(scheduler=_m.get_client())")
    assert kernel.json("print(json.dumps(_answer))") == 15

    def groups() -> dict | None:
        found = {g["group"]: g for g in read(kernel)["groups"]}
        done = found.get("abs") and found["abs"]["done"] == found["abs"]["total"] == 6
        return found if done and found.get("sum", {}).get("done") == 1 else None

    found = wait_for(groups, 15, "the panel to show the graph's progress", interval=0.2)
    assert found["abs"]["errors"] == 0
    assert not any(name.startswith(("[", '"')) for name in found)  # no raw JSON keys


def test_the_cancel_button_cancels_its_group(kernel: Kernel, net: Network) -> None:
    kernel.run("import time\n"
               "def napper(i):\n    time.sleep(60)\n    return i\n"
               "_naps = _m.get_client().map(napper, range(4))\n"
               "def keeper(i):\n    return i\n"
               "_kept = _m.get_client().submit(keeper, 1)")
    wait_for(lambda: (g := group(kernel, "napper")) and g["running"] >= 1, 20,
             "a napper to run", interval=0.2)
    kernel.run("panel.group_rows['napper'].cancel.click()")  # what the button's click sends
    g = wait_for(lambda: (g := group(kernel, "napper")) and g["status"] == "cancelled" and g,
                 15, "the napper group to end cancelled", interval=0.2)
    assert (g["cancelled"], g["total"]) == (4, 4)
    assert kernel.json("print(json.dumps([f.status for f in _naps]))") == ["cancelled"] * 4
    assert kernel.json("print(json.dumps(_kept.result(30)))") == 1  # other groups untouched
    wait_for(lambda: net.health()["tasks"]["running"] == 0, 15,
             "the gateway to have no task running")


def test_progress_draws_once_and_follows_an_uncomputed_collection(kernel: Kernel) -> None:
    ex = kernel.run("import dask.array as da\nfrom notebook_ext import progress\n"
                    "def slow_inc(b):\n    import time\n    time.sleep(0.05)\n    return b + 1\n"
                    "_x = da.ones(40, chunks=5).map_blocks(slow_inc, dtype=float)\n"
                    "_bar = progress(_x)\n_bar")
    widgets = [d for d in ex.displays()
               if "application/vnd.jupyter.widget-view+json" in d.get("data", {})]
    assert len(widgets) == 1, ex.messages  # drawn once, not once more as Out[...]
    assert ex.result is None
    got = kernel.json("_bar.state.finished.wait(60)\n_bar._thread.join(10)\n"
                      "print(json.dumps([{g.name: [g.done, g.total] "
                      "for g in _bar.state.groups.values()}, _bar.labels['slow_inc'].value,"
                      " float(_bar.persisted[0].sum().compute(scheduler=_m.get_client()))]))")
    groups, label, total = got
    assert groups["slow_inc"] == [8, 8] and label.startswith("8 / 8")
    assert total == 80.0


def test_a_checked_provider_that_reconnects_stays_checked(kernel: Kernel, net: Network) -> None:
    kernel.run("_row = next(r for r in panel.provider_rows.values() if r.name == 'p1')\n"
               "_row.check.value = True")
    p1 = kernel.json("print(json.dumps(_row.id))")
    old = net.providers[1]
    old.terminate()
    old.wait(15)

    def p1_row() -> dict | None:
        return next((p for p in read(kernel)["providers"] if p["name"] == "p1"), None)

    wait_for(lambda: (row := p1_row()) and not row["online"], 20, "p1 shown offline",
             interval=0.2)
    assert read(kernel)["selected"] == [p1]  # still chosen while it is away
    assert "offline" in kernel.json("print(json.dumps(_row.html.value))")
    net.providers[1] = net.start_provider(1)  # the same identity and name: the same id
    wait_for(lambda: (row := p1_row()) and row["online"], 30, "p1 back online", interval=0.2)
    assert read(kernel)["selected"] == [p1]
    kernel.run("%%decompute\nimport os\nos.getpid()")
    assert kernel.json("print(json.dumps(_m._magics.last_future.provider))") == p1
    kernel.run("_row.check.value = False")


def test_disconnected_greys_out_and_says_so(kernel: Kernel, net: Network) -> None:
    gateway = net.procs[0]
    gateway.terminate()
    gateway.wait(15)
    state = wait_for(lambda: (s := read(kernel))["status"] != "connected" and s, 30,
                     "the panel to see the gateway gone", interval=0.2)
    assert state["status"] in ("reconnecting", "lost")
    assert state["greyed"] is True
    assert state["providers"], "what was last known stays visible (greyed)"
    html = kernel.json("print(json.dumps(panel.header.value))")
    assert state["status"] in html
    disabled = kernel.json("print(json.dumps([r.check.disabled "
                           "for r in panel.provider_rows.values()]))")
    assert all(disabled)


def test_closing_stops_updates(kernel: Kernel) -> None:
    got = kernel.json("panel.close()\n"
                      "print(json.dumps([panel.updating, panel._thread.is_alive()]))")
    assert got == [False, False]
    kernel.run("%decompute panel --inline")  # a fresh panel replaces it and runs
    assert json.loads(kernel.run("print(json.dumps(_m._magics.panel.updating))").stream())
