"""``notebooks/zkml.ipynb`` (issue 14, the RISC Zero / zkML seed) executes headless with nbclient.

Against a real gateway with two priced sandboxed providers (which have ezkl) and **mallory**, a
:class:`zk_cheats.ZkProver` that proves and then tampers with the output. The notebook's own
assertions check what it shows (accuracy, proofs verified, the tampered one refused at no cost);
this test checks that it ran them, and that mallory was not paid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ezkl", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")
pytest.importorskip("onnx", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")
pytest.importorskip("sklearn", reason="the notebook trains on scikit-learn's bundled digits")

import nbformat  # noqa: E402
from kernel_fixtures import ROOT, Network  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from zk_cheats import ZkProver  # noqa: E402

from gateway.ledger import Ledger  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "zkml.ipynb"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("zkml-net"), providers=2).start()
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


def test_zkml_notebook_proves_verifies_and_refuses_the_cheater(net: Network,
                                                               tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with ZkProver(net.url, tmp_path / "mallory", name="mallory", tamper="output") as mallory:
        with Ledger(net.tmp / "ledger.sqlite") as led:
            mallory_before = led.balance(mallory.account)
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        client.execute(env=net.kernel_env(tmp_path / "home"))  # raises on the first failing cell
        nbformat.write(nb, tmp_path / "zkml.executed.ipynb")
        assert mallory.served, "mallory was given the tampering demonstration's task"
        with Ledger(net.tmp / "ledger.sqlite") as led:
            assert led.balance(mallory.account) == mallory_before
            led.check()  # conservation
    text = "\n".join(text_of(c) for c in nb.cells if c["cell_type"] == "code")
    print("\n" + text)
    assert "test accuracy" in text and "'verified': True" in text
    assert "refused: provider mallory" in text and "refused by the gateway" in text
    assert "client verify" in text
