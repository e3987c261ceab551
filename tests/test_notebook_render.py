"""``notebooks/render.ipynb`` (issue 14, the Render Network seed) executes headless with nbclient
against a real gateway, two real priced providers and a provider that returns noise for every
tile it gets (a :class:`cheating_provider.WorkingFake` the test starts): the notebook's own
assertions check the image against a local render, the costs against the balance and the
cheater's rank; here we check it named the cheater and saved the PNG.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from cheating_provider import WorkingFake
from kernel_fixtures import ROOT, Network
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "render.ipynb"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("render-net"), providers=2).start()
    yield network
    network.stop()


def text_of(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def test_render_notebook_catches_the_noisy_provider(net: Network, tmp_path: Path) -> None:
    with WorkingFake(net.url, tmp_path / "cheater", name="cheater", prices={"cpu": net.price},
                     lie_rate=1.0, seed=5) as cheater:
        net.wait_providers(3)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = NotebookClient(nb, timeout=60, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        t0 = time.monotonic()
        try:
            client.execute(env=net.kernel_env(tmp_path / "home"))  # raises on a failing cell
        finally:
            nbformat.write(nb, tmp_path / "render.executed.ipynb")
        took = time.monotonic() - t0
    text = "\n".join(text_of(c) for c in nb.cells if c["cell_type"] == "code")
    assert cheater.lies, "the cheater lied about no tile: the test proves nothing"
    assert "caught: ['cheater']" in text, text
    assert "matches a local render" in text
    png = (tmp_path / "render.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the final image is shown"
    print(f"\nrender notebook: {took:.1f} s; the cheater ran {cheater.ran} tasks, lied on "
          f"{len(cheater.lies)}")
    print("\n".join(line for line in text.splitlines()
                    if "tiles" in line or "caught" in line or "total" in line))
