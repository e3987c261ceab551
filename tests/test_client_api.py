"""The client as a user meets it (issue 10, acceptance 7 and the client's interfaces).

Quick, clean imports; ``help(Client.submit)`` that documents every reserved keyword; ``balance()``
as a :class:`Balance` of available and held tokens; ``InsufficientFunds`` at submit when the
client already knows; readable receipts that still verify; ``close()`` safe at any moment from
any thread; ``status``. Real gateway and providers (the session's shared ones, or a priced one).
"""

from __future__ import annotations

import inspect
import json
import pydoc
import subprocess
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest
from conftest import Gateway, start_gateway
from helpers import wait_for

from notebook_ext import Balance, Client, InsufficientFunds, verify_receipt

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def square(x: int) -> int:
    return x * x


# --------------------------------------------------------------------------- imports


def test_import_loads_neither_ipython_widgets_nor_dask_and_leaves_dask_config_alone() -> None:
    code = (
        "import json, sys\n"
        "import notebook_ext\n"
        "loaded = sorted(m for m in ('IPython', 'ipywidgets', 'dask') if m in sys.modules)\n"
        "import dask, dask.config, copy\n"
        "before = copy.deepcopy(dask.config.config)\n"
        "import importlib; importlib.reload(notebook_ext)\n"
        "from notebook_ext import Client, progress, load_ipython_extension\n"
        "print(json.dumps({'loaded': loaded, 'same': dask.config.config == before,\n"
        "                  'shuffle': dask.config.get('dataframe.shuffle.method', None)}))\n"
    )
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                          text=True, timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"loaded": [], "same": True, "shuffle": None}
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    # only the part before the reload counts: dask was imported by the check itself
    first = done.stderr.split("notebook_ext\n", 1)[0]
    for name in ("IPython", "ipywidgets", "dask"):
        assert f"| {name}\n" not in first and f"|   {name}" not in first, name
    assert "notebook_ext" in imported


def test_load_ext_still_works_lazily() -> None:
    code = ("import sys, notebook_ext\nassert 'IPython' not in sys.modules\n"
            "from IPython.testing.globalipapp import start_ipython\n"
            "ip = start_ipython()\nip.run_line_magic('load_ext', 'notebook_ext')\n"
            "print('decompute' in ip.magics_manager.magics['line'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_progress_stays_the_function_after_its_module_is_imported() -> None:
    code = ("import notebook_ext, notebook_ext.progress, types\n"
            "from notebook_ext import progress\n"
            "from notebook_ext.progress import ProgressState\n"
            "print(isinstance(progress, types.FunctionType), ProgressState.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "ProgressState"]


# --------------------------------------------------------------------------- signatures


RESERVED = ("key", "providers", "resources", "max_price", "budget", "redundancy", "timeout",
            "retries", "trust")


@pytest.mark.parametrize("method", [Client.submit, Client.map])
def test_submit_and_map_have_real_signatures_and_document_every_keyword(method) -> None:
    params = inspect.signature(method).parameters
    for name in RESERVED:
        assert name in params, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["retries"].default == 2 and params["redundancy"].default == 1
    text = pydoc.render_doc(Client.submit, renderer=pydoc.plaintext)
    for name in RESERVED:
        assert f"``{name}``" in text, name
    for unit in ("tokens", "seconds", "tokens per CPU-second", "default"):
        assert unit in text, unit


# --------------------------------------------------------------------------- money


def test_balance_is_available_with_held_beside_it(client: Client) -> None:
    balance = client.balance()
    assert isinstance(balance, Balance) and isinstance(balance, float)
    assert balance == balance.available and balance.held >= 0
    assert repr(balance).startswith("Balance(") and "available" in repr(balance)
    assert Balance.from_reply(12.5) == 12.5 and Balance.from_reply(12.5).held == 0
    both = Balance.from_reply({"available": 12.5, "held": 3})
    assert (both.available, both.held, repr(both)) == (12.5, 3.0, "Balance(12.5 available, 3 held)")


def test_a_budget_the_balance_cannot_cover_is_refused_at_submit(client: Client) -> None:
    available = client.balance().available
    with pytest.raises(InsufficientFunds, match="nothing was sent"):
        client.submit(square, 2, budget=available + 1)
    with pytest.raises(InsufficientFunds, match="mint"):
        client.map(square, range(10), budget=available / 5)
    assert client.submit(square, 3, budget=min(1.0, available / 2)).result(60) == 9


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    gw = start_gateway(tmp_path_factory.mktemp("priced-api"), local_providers=1,
                       extra=("--local-price-cpu", "0.5"))
    yield gw
    gw.stop()


def test_receipts_read_in_tokens_and_iso_time_and_still_verify(priced: Gateway,
                                                               tmp_path: Path) -> None:
    with Client(priced.url, home=tmp_path / "client", stream_output=False) as c:
        fut = c.submit(sum, range(100_000), budget=1)
        assert fut.result(60) == sum(range(100_000))
        wait_for(lambda: fut.receipt is not None, 10, message="the receipt")
        assert verify_receipt(fut.receipt, c.gateway_key)
        readable = fut.receipt.readable()
        assert readable["charged_tokens"] == fut.receipt["amount_micro"] / 1e6
        assert readable["settled_at"].endswith("+00:00") and "T" in readable["settled_at"]
        assert "tokens charged" in repr(fut.receipt) and "amount_micro" not in repr(fut.receipt)


# --------------------------------------------------------------------------- lifetime


def test_close_is_safe_around_failing_maps_many_times(gateway: Gateway, client_home: Path) -> None:
    for round_ in range(15):
        with Client(gateway.url, home=client_home, stream_output=False) as c:
            futs = c.map(boom, range(50), key=f"boom-{round_}")
            if round_ % 3 == 0:
                wait_for(lambda futs=futs: any(f.done() for f in futs), 30, message="a failure")
        assert c.status == "closed" and c._loop.is_closed()
        assert all(f.done() for f in futs)


def test_close_from_another_thread_while_results_arrive(gateway: Gateway,
                                                        client_home: Path) -> None:
    c = Client(gateway.url, home=client_home, stream_output=False)
    futs = c.map(square, range(500))
    closer = threading.Thread(target=c.close)
    wait_for(lambda: any(f.done() for f in futs), 30, message="first results")
    closer.start()
    c.close()  # twice, concurrently: both return
    closer.join(15)
    assert not closer.is_alive() and c.status == "closed"
    assert all(f.done() for f in futs)
    with pytest.raises(RuntimeError, match="closed"):
        c.submit(square, 1)


def test_status_says_connected_then_closed(gateway: Gateway, client_home: Path) -> None:
    c = Client(gateway.url, home=client_home, stream_output=False)
    assert c.status == "connected" and "connected" in repr(c)
    c.close()
    assert c.status == "closed"
