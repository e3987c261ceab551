"""``notebooks/quickstart.ipynb`` executes end to end (issue 5, item 7), headless with nbclient,
and in a real browser (item 8): JupyterLab on loopback, headless Chromium driven by Playwright.

It runs against a real gateway with two priced providers, as the notebook's own kernel: the
kernel gets ``DECOMPUTE_GATEWAY`` and its own ``DECOMPUTE_HOME``, as a user's would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from browser import ARTIFACTS, browser_or_skip, jupyter_lab, open_notebook, run_cell
from kernel_fixtures import ROOT, Network
from notebook_run import execute, network_fixture, text_of

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SHOTS = ARTIFACTS / "quickstart"


net = network_fixture("quickstart")



def test_quickstart_executes_end_to_end(net: Network, tmp_path: Path) -> None:
    nb = execute("quickstart", net, tmp_path)  # raises on the first failing cell
    cells = {c["source"].splitlines()[0]: c for c in nb.cells if c["cell_type"] == "code"}
    assert "p0" in text_of(cells["%decompute providers"])
    assert "(49, " in text_of(cells["def square(x):"])
    bars = [o for o in cells["import dask.array as da"]["outputs"]
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(bars) == 1  # progress() draws once, even as the cell's last value
    assert "999999000000" in text_of(cells["bar.persisted[0].compute(scheduler=client)"])
    remote = text_of(cells["%%decompute"])
    assert "scaled 100 values" in remote and "151" in remote  # streamed print and Out[...]
    assert "([3, 6, 9, 12, 15], 50.5)" in text_of(cells["scaled[:5], statistics.mean(data)"])
    later = cells["job.result(timeout=60), total, job.status"]
    assert "(15150, 15150, 'finished')" in text_of(later)
    assert "(144, True)" in text_of(cells["on_me = client.submit(square, 12, providers=[me.id])"])
    assert "stopped providing" in text_of(cells["%decompute stop-providing"])
    money = text_of(cells["from notebook_ext import GatewayRefused"])
    assert "balance:" in money and "cost" in money


# ---------------------------------------------------------------------- item 8: a real browser


def test_browser_shows_the_panel_in_the_sidebar(net: Network, tmp_path: Path) -> None:
    chromium = browser_or_skip()
    from playwright.sync_api import sync_playwright

    shutil.copy(NOTEBOOK, tmp_path / "quickstart.ipynb")
    with jupyter_lab(tmp_path, net.kernel_env(tmp_path / "home")) as lab, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            open_notebook(page, lab.url("quickstart.ipynb"))
            for first_line in ("%load_ext notebook_ext", "client = %decompute connect",
                               "%decompute providers", "%decompute panel"):
                run_cell(page, first_line)
            panel = page.locator("#jp-right-stack .dc-panel")
            panel.locator(".dc-pill", has_text="connected").wait_for(timeout=30_000)
            page.locator("#jp-right-stack .widget-checkbox").first.wait_for(timeout=30_000)
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "panel.png"))
            names = {t.strip() for t in panel.locator(".dc-name").all_inner_texts()}
            assert {"p0", "p1"} <= names, names
            assert "providers" in panel.inner_text()
        except Exception:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "failure.png"))  # what the browser showed
            print(f"screenshot of the failure: {SHOTS / 'failure.png'}")
            print("panel cell:", page.locator(".jp-CodeCell", has_text="%decompute panel")
                  .first.inner_text())
            raise
        finally:
            browser.close()
    print(f"screenshot: {SHOTS / 'panel.png'}")
