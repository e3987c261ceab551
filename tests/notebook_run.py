"""Running a notebook headless against a test network, and reading what its cells showed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_fixtures import ROOT, Network
from nbclient import NotebookClient

NOTEBOOKS = ROOT / "notebooks"


def network_fixture(name: str, providers: int = 2) -> Any:
    """A module-scoped :class:`Network` of ``providers`` priced providers."""

    @pytest.fixture(scope="module")
    def net(tmp_path_factory: pytest.TempPathFactory):
        network = Network(tmp_path_factory.mktemp(f"{name}-net"), providers=providers).start()
        yield network
        network.stop()

    return net


def execute(name: str, net: Network, tmp_path: Path, timeout: float = 60) -> Any:
    """Run ``notebooks/<name>.ipynb`` cell by cell (raises on the first failing cell); the
    executed copy is saved beside the test's files either way."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=net.kernel_env(tmp_path / "home"))
    finally:
        nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
    return nb


def text_of(cell: dict) -> str:
    """What a cell printed and displayed, as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def all_text(nb: Any) -> str:
    return "\n".join(text_of(c) for c in nb.cells if c["cell_type"] == "code")
