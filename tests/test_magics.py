"""``%%decompute`` in a real kernel against a real gateway and providers (issue 5, items 1-4).

Each cell is executed by jupyter_client exactly as JupyterLab sends it; what the tests read is
what a user sees: the cell's stream output, its ``Out[...]``, its error, and the namespace after.
"""

from __future__ import annotations

import time

import psutil
from helpers import gone
from kernel_fixtures import Kernel, Network, kernel_fixture, network_fixture, wait_for

net = network_fixture("magics")
kernel = kernel_fixture("magics", lambda k: k.run("import json, os"))


def submitted(kernel: Kernel) -> int:
    return kernel.json("import notebook_ext.magics as _m\n"
                       "print(_m.get_client()._decompute_tracker.submitted)")


def test_cell_reads_names_prints_assigns_and_displays(kernel: Kernel, net: Network) -> None:
    kernel.run("x = 3\ndata = [1, 2, 3]")
    ex = kernel.run("%%decompute\nimport os\nprint('sum is', sum(data) + x)\n"
                    "y = [v * x for v in data]\npid = os.getpid()\n{'y': y, 'pid': pid}")
    assert "sum is 9" in ex.stream()
    assert ex.result is not None and "'y': [3, 6, 9]" in ex.result  # shown as Out[...]
    got = kernel.json("print(json.dumps({'y': y, 'pid': pid, 'kernel': os.getpid()}))")
    assert got["y"] == [3, 6, 9]
    assert got["pid"] != got["kernel"]
    ancestors = {p.pid for p in psutil.Process(got["pid"]).parents()}
    assert ancestors & {p.pid for p in net.providers}, "the cell did not run in a provider"


def test_remote_error_shows_traceback_and_kernel_stays_usable(kernel: Kernel) -> None:
    ex = kernel.execute("%%decompute\ndef f(v):\n    return 1 / v\nf(0)")
    assert ex.status == "error"
    assert ex.error["ename"] == "ZeroDivisionError"
    tb = "\n".join(ex.error["traceback"])
    assert "Cell In[" in tb and "return 1 / v" in tb and "f(0)" in tb
    assert "run_cell" not in tb  # the runner's own frames are not the user's business
    assert kernel.run("1 + 1").result == "2"
    assert kernel.run("%%decompute\n40 + 2").result == "42"


def test_interrupt_cancels_the_remote_run(kernel: Kernel) -> None:
    seen: dict[str, int] = {}

    def on_message(msg: dict) -> None:
        text = msg["content"].get("text", "") if msg["msg_type"] == "stream" else ""
        if "pid=" in text and "pid" not in seen:
            seen["pid"] = int(text.split("pid=")[1].split()[0])
            kernel.km.interrupt_kernel()

    ex = kernel.execute("%%decompute\nimport os, time\nprint(f'pid={os.getpid()}')\n"
                        "time.sleep(60)", timeout=30, on_message=on_message)
    assert "pid" in seen, ex.messages
    assert ex.status == "error" and ex.error["ename"] == "KeyboardInterrupt"
    assert "cancelled the remote run" in ex.stream("stderr")
    status = [d["data"]["text/plain"] for d in ex.displays()][-1]
    assert "interrupted" in status and "cancelled" in status and "running" not in status
    wait_for(lambda: gone(seen["pid"]), 15, "the provider's task process to end")
    assert kernel.run("%%decompute\n'still works'").result == "'still works'"


def test_the_status_line_stays_at_the_top_of_the_output(kernel: Kernel) -> None:
    ex = kernel.run("%%decompute\nimport time\nprint('first', flush=True)\ntime.sleep(2.6)\n"
                    "print('last')")
    outputs = [m for m in ex.messages if m["msg_type"] in ("stream", "display_data")]
    assert outputs[0]["msg_type"] == "display_data", [m["msg_type"] for m in outputs]
    handle = outputs[0]["content"]["transient"]["display_id"]
    updates = [m["content"] for m in ex.messages if m["msg_type"] == "update_display_data"]
    assert updates and all(u["transient"]["display_id"] == handle for u in updates)
    assert "finished" in updates[-1]["data"]["text/plain"]
    assert "first" in ex.stream() and "last" in ex.stream()


def test_async_returns_at_once_then_names_appear(kernel: Kernel) -> None:
    started = time.monotonic()
    ex = kernel.run("%%decompute --async -o fut\nimport time\ntime.sleep(2)\nz = 42\nz * 2")
    assert time.monotonic() - started < 1.5
    assert ex.result is None
    count = ex.reply["content"]["execution_count"]
    assert any(f"decompute In[{count}]: " in d["data"]["text/plain"] for d in ex.displays())
    assert kernel.json("print(json.dumps('z' in dir()))") is False
    got = kernel.json("print(json.dumps([fut.result(timeout=30), z, fut.status]))")
    assert got == [84, 42, "finished"]


def test_push_and_pull_override_the_analysis(kernel: Kernel) -> None:
    kernel.run("a = 5\nb = 7")
    kernel.run("%%decompute --push a --pull c\nc = a * 2\nd = 1")
    assert kernel.json("print(json.dumps([c, 'd' in dir()]))") == [10, False]
    ex = kernel.execute("%%decompute --push a\nz2 = a + b")  # b not sent: a NameError remotely
    assert ex.error["ename"] == "NameError" and "'b'" in ex.error["evalue"]


def test_unpicklable_name_is_named_before_anything_is_sent(kernel: Kernel) -> None:
    kernel.run("import threading\nlock = threading.Lock()")
    before = submitted(kernel)
    ex = kernel.execute("%%decompute\nwith lock:\n    pass")
    assert ex.status == "error" and ex.error["ename"] == "UsageError"
    assert "'lock'" in ex.error["evalue"] and "cannot be pickled" in ex.error["evalue"]
    assert submitted(kernel) == before


def test_safe_decoding_by_default_and_trust_opts_in(kernel: Kernel) -> None:
    kernel.run("%%decompute\nimport numpy as np\nimport pandas as pd\narr = np.arange(5.0)\n"
               "frame = pd.DataFrame({'a': arr})\nwhen = pd.Timestamp('2024-01-02')")
    got = kernel.json("print(json.dumps([type(arr).__name__, arr.flags.writeable, "
                      "list(frame.shape), str(when.date()), np.__name__]))")
    assert got == ["ndarray", True, [5, 1], "2024-01-02", "numpy"]
    cell = ("class Point:\n    def __init__(self, x):\n        self.x = x\n"
            "p = Point(3)\nq = p.x + 1")
    ex = kernel.run("%%decompute\n" + cell)
    assert "p (refers to" in ex.stream("stderr") and "--trust" in ex.stream("stderr")
    assert kernel.json("print(json.dumps([q, 'p' in dir()]))") == [4, False]
    kernel.run("%%decompute --trust\n" + cell)
    assert kernel.json("print(json.dumps(p.x))") == 3


def test_flags_map_onto_submit_and_help_is_complete(kernel: Kernel, net: Network) -> None:
    ex = kernel.run("%%decompute?")
    page = ex.reply["content"]["payload"][0]["data"]["text/plain"]
    for flag in ("--provider", "--cpus", "--memory", "--gpus", "--max-price", "--budget",
                 "--redundancy", "--timeout", "--async", "--push", "--pull", "--trust"):
        assert flag in page
    page = kernel.run("%decompute?").reply["content"]["payload"][0]["data"]["text/plain"]
    for sub in ("connect", "providers", "balance", "panel", "provide [--cpus", "stop-providing"):
        assert sub in page
    ex = kernel.execute("%%decompute --provider p1 --timeout 1\nimport time\ntime.sleep(30)")
    assert ex.error["ename"] == "TimeoutError"
    where = kernel.json("import notebook_ext.magics as _m\n"
                        "print(json.dumps(_m._magics.last_future.provider))")
    assert where.startswith("p1-")
    ex = kernel.execute("%%decompute --provider nobody\n1")
    assert ex.error["ename"] == "UsageError" and "'nobody'" in ex.error["evalue"]
    ex = kernel.execute("%%decompute --cpus 64\n1", timeout=30)
    assert ex.error["ename"] == "NoMatchingProvider"


def test_invalid_cells_are_refused_before_anything_is_sent(kernel: Kernel) -> None:
    before = submitted(kernel)
    ex = kernel.execute("%%decompute\nx = (")
    assert ex.error["ename"] == "UsageError" and "not valid Python" in ex.error["evalue"]
    ex = kernel.execute("%%decompute\n!ls")
    assert ex.error["ename"] == "UsageError" and "only work in the kernel" in ex.error["evalue"]
    assert submitted(kernel) == before


def test_a_scattered_future_pushed_to_a_cell_is_read_where_it_runs(kernel: Kernel) -> None:
    kernel.run("import numpy as np\nimport notebook_ext.magics as _m\n"
               "big = _m.get_client().scatter(np.arange(10.0))\n_ = big.result(30)")
    kernel.run("%%decompute\ntotal = float(big.sum())\nkind = type(big).__name__")
    assert kernel.json("print(json.dumps([total, kind]))") == [45.0, "ndarray"]
