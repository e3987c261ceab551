"""``notebooks/zkml.ipynb`` (issue 14, the RISC Zero / zkML seed) executes headless with nbclient.

Against a real gateway with two priced sandboxed providers (which have ezkl) and **mallory**, a
:class:`zk_cheats.ZkProver` that proves and then tampers with the output. The notebook's own
assertions check what it shows (accuracy, proofs verified, the tampered one refused at no cost);
this test checks that it ran them, and that mallory was not paid.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("ezkl", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")
pytest.importorskip("onnx", reason="decompute[zk] is not installed (pip install 'decompute[zk]')")
pytest.importorskip("sklearn", reason="the notebook trains on scikit-learn's bundled digits")

from kernel_fixtures import Network  # noqa: E402
from notebook_run import all_text, execute, network_fixture  # noqa: E402
from zk_cheats import ZkProver  # noqa: E402

from gateway.ledger import Ledger  # noqa: E402

net = network_fixture("zkml")




def test_zkml_notebook_proves_verifies_and_refuses_the_cheater(net: Network,
                                                               tmp_path: Path) -> None:
    with ZkProver(net.url, tmp_path / "mallory", name="mallory", tamper="output") as mallory:
        with Ledger(net.tmp / "ledger.sqlite") as led:
            mallory_before = led.balance(mallory.account)
        nb = execute("zkml", net, tmp_path, timeout=300)
        assert mallory.served, "mallory was given the tampering demonstration's task"
        with Ledger(net.tmp / "ledger.sqlite") as led:
            assert led.balance(mallory.account) == mallory_before
            led.check()  # conservation
    text = all_text(nb)
    assert re.search(r"the panel shows [1-9]\d* tasks", text), "the panel showed no task"
    print("\n" + text)
    assert "test accuracy" in text and "'verified': True" in text
    assert "refused: provider mallory" in text and "refused by the gateway" in text
    assert "client verify" in text
