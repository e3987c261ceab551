"""Issue 14, acceptance 6 (training): ``notebooks/training.ipynb`` executes headless with nbclient
against a real gateway with two honest priced providers and a provider that skips work.

The cheater (:class:`cheaters.StepRunner`, ``skip=7``) omits one gradient step in every run it is
given; the notebook's refereed rounds must catch it, keep its work out of the model (the notebook
asserts the model equals an honest replay and reaches 0.9 test accuracy), and its Yuma round must
pay it nothing. The notebook's kernel gets ``DECOMPUTE_GATEWAY`` and its own ``DECOMPUTE_HOME``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from cheaters import StepRunner
from kernel_fixtures import Network
from money_audit import books_settle
from notebook_run import all_text, execute, network_fixture

from gateway.receipt_log import ReceiptLog, decode_entry

net = network_fixture("training")



def leaves(db: Path) -> list[dict]:
    with ReceiptLog(db) as rl:
        return [decode_entry(e) for e in rl.entries(0, rl.size())]



def test_training_notebook_catches_the_lazy_provider(net: Network, tmp_path: Path) -> None:
    with StepRunner(net.url, tmp_path / "lazy", name="lazy", skip=7,
                    prices={"cpu": 1.0}) as lazy:
        net.wait_providers(3)
        started = time.perf_counter()
        nb = execute("training", net, tmp_path, timeout=120)
        took = time.perf_counter() - started
        text = all_text(nb)
        assert re.search(r"the panel shows [1-9]\d* tasks", text), "the panel showed no task"
        assert f"caught: ['{lazy.id}']" in text, text
        assert "final test accuracy: 0.9" in text, text
        assert "each a verified leaf of the receipt log" in text
        assert lazy.runs > 0
        for leaf in leaves(net.tmp / "ledger.sqlite"):  # paid only for tasks it ran alone
            paid = {p["account"]: p["paid_micro"] for p in leaf["providers"]}
            if paid.get(lazy.account):  # (a validator's scoring): no refereed run, no reward
                assert len(paid) == 1 and leaf["function_hash"] != "transfer", leaf
        print(f"training notebook: {took:.1f} s")
        assert took < 90
    books_settle(net.tmp / "ledger.sqlite")
