"""The panel in a real browser (issue 10, acceptance 6): JupyterLab on loopback, headless
Chromium driven by Playwright, a real gateway and two priced providers.

The notebook opens the panel in the right sidebar, starts a map that keeps running, a Dask graph
and an ``--async`` cell; the test then drags the sidebar to 300 px and to 1,000 px and keeps a
screenshot of each (connected, with tasks running), reads the text a user sees (balance available
and held, the connection pill, grouped task names), clicks a group's cancel button and watches
its tasks end cancelled, and finally stops the gateway to see and keep the disconnected panel.
Screenshots go to ``tests/artifacts/panel/`` (git-ignored); their paths are printed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from browser import ARTIFACTS, browser_or_skip, code_cell, jupyter_lab, open_notebook, run_cell
from browser import set_right_sidebar_width as set_width
from kernel_fixtures import Network, wait_for

CELLS = [
    "%load_ext notebook_ext",
    "%decompute panel",
    "import dask\nfrom notebook_ext.magics import get_client\nclient = get_client()\n"
    "parts = [dask.delayed(abs)(-i) for i in range(6)]\n"
    "answer = dask.delayed(sum)(parts).compute(scheduler=client)\nanswer",
    "%%decompute\nimport time\nprint('computing on a provider', flush=True)\n"
    "time.sleep(2.5)\nprint('done computing')\n6 * 7",
    "def napper(i):\n    import time\n    time.sleep(120)\n    return i\n\n"
    "naps = client.map(napper, range(4))",
    "%%decompute --async -o job\nimport time\ntime.sleep(120)",
]
SHOTS = ARTIFACTS / "panel"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    network = Network(tmp_path_factory.mktemp("panel-browser-net"), providers=2).start()
    yield network
    network.stop()


def shoot(page: Any, name: str) -> Path:
    """A screenshot of the sidebar and one of the whole window, kept as artifacts."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.locator("#jp-right-stack").screenshot(path=str(path))
    page.screenshot(path=str(SHOTS / f"{name}-window.png"))
    print(f"screenshot: {path}")
    return path


def sidebar_text(page: Any) -> str:
    return page.locator("#jp-right-stack .dc-panel").inner_text()


def tallest_line(page: Any) -> float:
    """The tallest one-line element's height over its line height: nothing may wrap."""
    return page.evaluate("""() => Math.max(...[...document.querySelectorAll(
        '#jp-right-stack .dc-row, #jp-right-stack .dc-balance, #jp-right-stack .dc-sub,'
        + ' #jp-right-stack .dc-section, #jp-right-stack .dc-foot')]
        .filter(e => e.offsetParent !== null)
        .map(e => e.getBoundingClientRect().height /
                  parseFloat(getComputedStyle(e).lineHeight || '16')))""")


def significant(amount: str) -> int:
    """Significant digits shown in a token amount below 1,000 (``0.000451`` -> 3)."""
    whole, _, frac = amount.replace(",", "").partition(".")
    if len(whole) > 3:
        return 3  # thousands keep their integer digits, and no decimals
    return len((whole + frac).lstrip("0")) or 1


def wait_text(page: Any, pattern: str, timeout: float = 30.0) -> str:
    regex = re.compile(pattern)

    def shown() -> str | None:
        text = sidebar_text(page)
        return text if regex.search(text) else None

    return wait_for(shown, timeout, f"the panel to show /{pattern}/", interval=0.2)


@pytest.mark.timeout(300)  # JupyterLab, Chromium and two kernels' worth of start-up
def test_panel_in_the_sidebar_at_300_and_1000_px(net: Network, tmp_path: Path) -> None:
    chromium = browser_or_skip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, tmp_path / "panel.ipynb")
    env = net.kernel_env(tmp_path / "home")
    with jupyter_lab(tmp_path, env) as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            open_notebook(page, lab.url("panel.ipynb"))
            for cell in CELLS:
                run_cell(page, cell.splitlines()[0])
            page.locator("#jp-right-stack .dc-panel").wait_for(timeout=60_000)
            cell = code_cell(page, "%%decompute")
            cell_outputs = cell.locator(".jp-OutputArea-output")
            first = cell_outputs.first.inner_text()  # the status line, above what it printed
            assert re.match(r"● In\[\d+\] finished · on p\d", first.strip()), first
            assert "computing on a provider" in cell_outputs.nth(1).inner_text()
            cell.screenshot(path=str(SHOTS / "cell-status-line.png"))
            text = wait_text(page, r"napper[\s\S]*In\[\d+\]|In\[\d+\][\s\S]*napper")
            text = wait_text(page, r"\d tokens available")

            # ---- connected, tasks running, at 300 px
            assert abs(set_width(page, 300) - 300) < 12
            text = wait_text(page, r"napper\s+\d/4 · \d running")
            shoot(page, "connected-300")
            assert "connected" in text
            assert re.search(r"[\d,.]+ tokens available", text), text
            assert re.search(r"· [\d,.]+ held", text), text  # escrow of the running tasks
            amounts = re.findall(r"([\d,]+\.?\d*) (?:tok|tokens|held)", text)
            assert amounts and all(significant(a) <= 3 for a in amounts), amounts
            for name in ("napper", "abs", "sum", "p0", "p1"):
                assert name in text, (name, text)
            assert re.search(r"In\[\d+\]", text), text
            assert "[\"" not in text, "raw JSON Dask keys"
            assert tallest_line(page) < 2.2, "a line wraps at 300 px"
            pill = page.locator("#jp-right-stack .dc-pill")
            assert pill.inner_text() == "connected"
            assert "rgb(30, 126, 52)" in pill.evaluate("e => getComputedStyle(e).backgroundColor")

            # ---- the same, 1,000 px wide: more detail, still one line per row
            assert abs(set_width(page, 1000) - 1000) < 12
            page.wait_for_function("() => [...document.querySelectorAll("
                                   "'#jp-right-stack .dc-wide')].some(e => e.offsetParent)")
            shoot(page, "connected-1000")
            assert tallest_line(page) < 1.6

            # ---- the napper group's cancel button, clicked at 300 px, cancels its tasks
            set_width(page, 300)
            page.locator("#jp-right-stack").get_by_title(
                "cancel the unfinished tasks of napper").click()
            wait_text(page, r"napper\s+4/4 · 4 cancelled")
            wait_for(lambda: net.health()["tasks"]["pending"] == 0
                     and net.health()["tasks"]["running"] <= 1, 20,
                     "the gateway to drop the cancelled tasks (only the cell's job left)")

            # ---- disconnected: the gateway stops, the panel says so and greys out
            net.procs[0].terminate()
            net.procs[0].wait(15)
            text = wait_text(page, r"reconnecting|lost")
            page.locator("#jp-right-stack .dc-off").wait_for(timeout=10_000)
            assert page.locator("#jp-right-stack .dc-pill").inner_text() in ("reconnecting",
                                                                             "lost")
            shoot(page, "disconnected-300")
            set_width(page, 1000)
            shoot(page, "disconnected-1000")
            opacity = page.evaluate("() => getComputedStyle(document.querySelector("
                                    "'#jp-right-stack .dc-off .dc-dim')).opacity")
            assert float(opacity) < 0.6
            assert "napper" in sidebar_text(page)  # what was last known stays, greyed
        except Exception:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "failure.png"))
            print(f"screenshot of the failure: {SHOTS / 'failure.png'}")
            raise
        finally:
            browser.close()
