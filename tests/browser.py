"""JupyterLab on loopback and headless Chromium (Playwright) for the browser tests.

Plain helpers, imported explicitly (``from browser import ...``): a test that needs a browser
skips with the reason printed when JupyterLab, Playwright or Chromium is missing. Every wait is on
a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
#: Screenshots kept after the run (git-ignored), one folder per test.
ARTIFACTS = ROOT / "tests" / "artifacts"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def browser_or_skip() -> str:
    """Chromium's path, or a skip that says why (printed, so it shows in every test log)."""
    missing = [m for m in ("jupyterlab", "playwright") if importlib.util.find_spec(m) is None]
    if missing:
        reason = f"browser test needs {' and '.join(missing)} (pip install -e '.[dev]')"
    elif (path := chromium_path()) is None:
        reason = "browser test needs Chromium: apt-get install chromium (make chromium)"
    else:
        return path
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab server."""

    base: str
    token: str

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?token={self.token}"


@contextlib.contextmanager
def jupyter_lab(root: Path, env: dict[str, str]) -> Iterator[Lab]:
    """A JupyterLab server serving ``root`` whose kernels get ``env`` (a user's settings: no
    news or update checks), stopped on exit."""
    port, token = free_port(), secrets.token_hex(16)
    settings = root / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(env, JUPYTER_RUNTIME_DIR=str(root / ".runtime"),
               JUPYTER_CONFIG_DIR=str(root / ".config"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={root / '.lab-settings'}",
           f"--LabApp.workspaces_dir={root / '.workspaces'}"]
    with open(root / "lab.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited; see {root / 'lab.log'}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 60, "JupyterLab to serve", interval=0.1)
        yield Lab(base, token)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def open_notebook(page: Any, url: str) -> None:
    """Open a notebook and wait for its kernel to be idle. Under load JupyterLab may open it
    before it knows the kernelspecs and then asks which kernel to use; a user would click
    "Select", so do that whenever the dialog shows."""
    choose = page.locator(".jp-Dialog", has_text="Select Kernel")
    page.add_locator_handler(choose, lambda: choose.get_by_role("button", name="Select").click())
    page.goto(url)
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=60_000)


def code_cell(page: Any, first_line: str) -> Any:
    """The code cell whose source starts with the line ``first_line`` (a text match anywhere
    in the cell would also find later cells that merely contain it)."""
    cells = page.locator(".jp-CodeCell")

    def index() -> int | None:  # cells render lazily: wait for it to be drawn
        firsts = cells.evaluate_all(
            "cs => cs.map(c => (c.querySelector('.cm-line') || {}).textContent || '')")
        found = [i for i, text in enumerate(firsts) if text.strip() == first_line.strip()]
        return found[0] + 1 if found else None

    return cells.nth(wait_for(index, 30, f"a code cell starting {first_line!r}",
                              interval=0.1) - 1)


def run_cell(page: Any, first_line: str, timeout: float = 60_000) -> None:
    """Click the code cell starting with ``first_line``, Shift+Enter it as a user would, and
    wait until its prompt shows a number (it ran)."""
    from playwright.sync_api import expect

    cell = code_cell(page, first_line)
    prompt = cell.locator(".jp-InputArea-prompt")
    for _attempt in range(3):  # a run interrupted by the kernel dialog is dropped: redo it
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).to_have_text(re.compile(r"\[[\d*]+\]"), timeout=8_000)
            break
        except AssertionError:
            continue
    expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout)


def set_right_sidebar_width(page: Any, width: int) -> float:
    """Drag the handle between the main area and the right sidebar, as a user would, until the
    sidebar is ``width`` px wide; returns the width reached."""
    box = page.evaluate("""() => {
        const stack = document.querySelector('#jp-right-stack').getBoundingClientRect();
        const handles = [...document.querySelectorAll('.lm-SplitPanel-handle')]
          .map(h => h.getBoundingClientRect()).filter(r => r.width > 0 && r.height > 0);
        handles.sort((a, b) => Math.abs(a.right - stack.left) - Math.abs(b.right - stack.left));
        const h = handles[0];
        return {x: h.left + h.width / 2, y: h.top + h.height / 2, right: stack.right};
    }""")
    page.mouse.move(box["x"], box["y"])
    page.mouse.down()
    page.mouse.move(box["right"] - width, box["y"], steps=8)
    page.mouse.up()
    return page.evaluate(
        "() => document.querySelector('#jp-right-stack').getBoundingClientRect().width")
