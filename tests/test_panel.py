"""The widget panel in a real kernel (issue 5, item 5): its widgets are read from the kernel.

The test acts as the front end would: it reads widget values and sets a checkbox's ``value``
(exactly what a click sends over the comm), then checks what the kernel does with it.
"""

from __future__ import annotations

import json

import pytest
from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture, wait_for

# Reads the panel's widget tree in the kernel: every checkbox, plus the panel's own summary.
READ = """
import ipywidgets as _w
def _walk(w):
    yield w
    for c in getattr(w, "children", ()):
        yield from _walk(c)
_boxes = [c for c in _walk(panel) if isinstance(c, _w.Checkbox)]
print(json.dumps({"boxes": {c.description: c.value for c in _boxes}, **panel.state()}))
"""


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


def test_panel_lists_the_live_providers(kernel: Kernel, net: Network) -> None:
    state = read(kernel)
    assert sorted(state["boxes"]) == ["p0", "p1"]
    assert sorted(p["name"] for p in state["providers"]) == sorted(net.health()["provider_names"])
    row = state["providers"][0]
    assert row["CPUs"] == "1" and row["prices"] == "cpu 1" and row["sandbox"]
    assert state["connection"] == "● connected" and state["updating"] is True
    assert state["gateway"] == net.url


def test_checking_a_provider_sends_the_next_cells_there(kernel: Kernel) -> None:
    kernel.run("_row = next(r for r in panel.provider_rows.values()\n"
               "            if r.check.description == 'p1')\n"
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


def test_balance_and_cost_fields_change_after_a_task(kernel: Kernel) -> None:
    before = read(kernel)
    kernel.run("%%decompute\nimport time\n_t = time.process_time()\n"
               "while time.process_time() - _t < 0.3:\n    pass")
    key = kernel.json("print(json.dumps(_m._magics.last_future.key))")

    def task_row() -> dict | None:
        state = read(kernel)
        row = next((t for t in state["tasks"] if t["key"] == key), None)
        return row if row and row["status"] == "finished" and row["cpu_seconds"] > 0 else None

    row = wait_for(task_row, 15, "the panel to show the finished task", interval=0.2)
    assert row["provider"]
    after = read(kernel)
    assert int(after["totals"]["tasks"]) > int(before["totals"]["tasks"])
    if before["balance"] == "—":
        pytest.skip("this gateway keeps no ledger yet: the balance shows '—'; "
                    "cost and balance cannot move")
    wait_for(lambda: read(kernel)["balance"] != before["balance"], 15,
             "the panel's balance to change", interval=0.2)
    spent = wait_for(lambda: float(read(kernel)["totals"]["tokens"]), 15,
                     "tokens spent to be non-zero", interval=0.2)
    assert spent > float(before["totals"]["tokens"])
    assert float(read(kernel)["balance"].split()[0]) < float(before["balance"].split()[0])


def test_a_dask_graph_shows_its_progress_by_task_group(kernel: Kernel) -> None:
    kernel.run("import dask\n"
               "_parts = [dask.delayed(abs)(-i) for i in range(6)]\n"
               "_total = dask.delayed(sum)(_parts)\n"
               "_answer = _total.compute(scheduler=_m.get_client())")
    assert kernel.json("print(json.dumps(_answer))") == 15

    def groups() -> dict | None:
        found = {g["group"]: g for g in read(kernel)["progress"]}
        done = found.get("abs") and found["abs"]["done"] == found["abs"]["total"] == 6
        return found if done and found.get("sum", {}).get("done") == 1 else None

    found = wait_for(groups, 15, "the panel to show the graph's progress", interval=0.2)
    assert found["abs"]["errors"] == 0


def test_closing_stops_updates(kernel: Kernel) -> None:
    got = kernel.json("panel.close()\n"
                      "print(json.dumps([panel.updating, panel._thread.is_alive()]))")
    assert got == [False, False]
    kernel.run("%decompute panel --inline")  # a fresh panel replaces it and runs
    assert json.loads(kernel.run("print(json.dumps(_m._magics.panel.updating))").stream())
