"""A ledger that fails in the middle of settling, under a real gateway (issue 11).

The attack (or the accident): the SQLite file refuses one task's settlement while the gateway
runs. Here a trigger in the real ledger file aborts every settlement row of tasks whose key holds
``poison``; refunds still work. The gateway's accounting worker fails that escrow alone, the core
puts its books back as the disk has them and closes the escrow, the client gets a clear error for
that task, every other task settles with a verifiable receipt, and the gateway keeps serving.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from pathlib import Path

import cloudpickle
import pytest
from conftest import start_gateway

from gateway.ledger import Ledger
from notebook_ext import Client, verify_receipt

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRIGGER = """
CREATE TRIGGER poison BEFORE INSERT ON escrow_usage WHEN NEW.task_id LIKE '%poison%'
BEGIN SELECT RAISE(ABORT, 'injected: the disk refused this settlement'); END;
"""


def inc(x: int) -> int:
    return x + 1


def test_a_ledger_failure_fails_that_task_alone_returns_its_escrow_and_serving_goes_on(
        tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "gw", local_providers=1,
                       extra=("--local-price-cpu", "0.5", "--fee-percent", "10"))
    db = tmp_path / "gw" / "ledger.sqlite"
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            assert client.submit(inc, 0, key="warm-up").result(60) == 1
            with contextlib.closing(sqlite3.connect(db)) as conn:
                conn.executescript(TRIGGER)
            before = client.balance()
            bad = client.submit(inc, 1, key="poison-1", budget=2.0)
            good = client.map(inc, range(5), key="after", budget=2.0)
            with pytest.raises(Exception, match="ledger could not record task poison-1") as err:
                bad.result(60)
            assert "its escrow was returned" in str(err.value)
            assert [f.result(60) for f in good] == [1, 2, 3, 4, 5]
            assert all(verify_receipt(f.receipt, client.gateway_key) for f in good)
            spent = sum(f.cost for f in good)
            after = client.balance()
            assert after.held == 0
            assert round(before.available - after.available, 6) == round(spent, 6)
            # the gateway serves on: a new task after the failure settles with its receipt
            again = client.submit(inc, 41, key="later")
            assert again.result(60) == 42 and verify_receipt(again.receipt, client.gateway_key)
        with Ledger(db) as ledger:
            assert ledger.open_escrows() == {}
            ledger.check(live=())
            totals = ledger.totals()
            assert totals.conserved
    finally:
        gw.stop()
