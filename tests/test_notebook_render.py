"""``notebooks/render.ipynb`` (issue 14, the Render Network seed) executes headless with nbclient
against a real gateway, two real priced providers and a provider that returns noise for every
tile it gets (a :class:`cheating_provider.WorkingFake` the test starts): the notebook's own
assertions check the image against a local render, the costs against the balance and the
cheater's rank; here we check it named the cheater and saved the PNG.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from cheating_provider import WorkingFake
from kernel_fixtures import Network
from notebook_run import all_text, execute, network_fixture

net = network_fixture("render")




def test_render_notebook_catches_the_noisy_provider(net: Network, tmp_path: Path) -> None:
    with WorkingFake(net.url, tmp_path / "cheater", name="cheater", prices={"cpu": net.price},
                     lie_rate=1.0, seed=5) as cheater:
        net.wait_providers(3)
        t0 = time.monotonic()
        nb = execute("render", net, tmp_path)
        took = time.monotonic() - t0
    text = all_text(nb)
    assert re.search(r"the panel shows [1-9]\d* tasks", text), "the panel showed no task"
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
