"""`make demo`: a local decompute network and the quickstart notebook run through it, headless.

Starts a gateway with two sandboxed providers on loopback (they charge 0.5 tokens per CPU-second),
executes ``notebooks/quickstart.ipynb`` in a real kernel with nbclient (saved beside it as
``quickstart.executed.ipynb``), prints what each cell did, and shuts everything down.

``make demo NOTEBOOK=render`` (``demo.py render``) runs ``notebooks/render.ipynb`` the same way,
with a third provider that returns noise for every tile it gets (the test suite's cheating
provider, :mod:`tests.cheating_provider`), so the spot checks have someone to catch.
``NOTEBOOK=training`` runs with three providers (a refereed dispute needs a third account),
``NOTEBOOK=zkml`` with the two (it needs ``decompute[zk]``, in the dev extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.local import LocalNetwork  # noqa: E402

PRICE = ["--local-price-cpu", "0.5"]


def text_of(output: dict) -> str:
    """What a person would read in one cell output."""
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    if "text/plain" in data:
        return data["text/plain"]
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return ""


def show(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        print(f"\n  In  > {first}")
        shown = [t.strip() for t in map(text_of, cell.get("outputs", [])) if t.strip()]
        for text in shown:
            lines = text.splitlines()
            for line in lines[:8]:
                print(f"  Out < {line[:110]}")
            if len(lines) > 8:
                print(f"  Out < ... ({len(lines) - 8} more lines)")


def cheater(url: str, home: str) -> contextlib.AbstractContextManager:
    """For the render notebook: a provider that returns noise for every tile it gets."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from cheating_provider import WorkingFake

    print("  plus a provider that returns noise for every tile it gets ('cheater')")
    return WorkingFake(url, Path(home) / "cheater", name="cheater", prices={"cpu": 0.5},
                       lie_rate=1.0)


def main(name: str = "quickstart") -> None:
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    providers = 3 if name == "training" else 2  # refereed runs need a third account
    print(f"decompute demo: a gateway with {providers} sandboxed local providers "
          f"(0.5 tokens/cpu-s) ...")
    with tempfile.TemporaryDirectory() as home, LocalNetwork(providers, extra_args=PRICE) as net, \
            (cheater(net.url, home) if name == "render" else contextlib.nullcontext()):
        print(f"  up at {net.url} in {time.perf_counter() - t0:.1f} s; running {name}.ipynb")
        nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
        env = dict(os.environ, DECOMPUTE_GATEWAY=net.url, DECOMPUTE_HOME=home)
        client = NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}})
        try:
            client.execute(env=env)
        finally:
            out = HERE / f"{name}.executed.ipynb"
            nbformat.write(nb, out)
            show(nb)
            print(f"\n  executed notebook saved to {out.relative_to(HERE.parent)}")
        health = net.health()
        print(f"  gateway: {health['providers']} providers online, "
              f"{health['tasks']['running']} tasks running; shutting down ...")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:2])
