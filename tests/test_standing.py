"""The gateway's own books about providers, without a network: deadlines, standing, names."""

from __future__ import annotations

from pathlib import Path

from gateway.deadlines import Deadlines, Kind
from gateway.names import Names
from gateway.standing import BENCH_AFTER, BENCH_SECONDS, INITIAL_ALLOWANCE, Standing


def test_deadlines_come_due_in_order_and_a_tick_is_bounded() -> None:
    d = Deadlines()
    for i, when in enumerate([5.0, 1.0, 3.0, 2.0]):
        d.at(when, f"t{i}", 1, Kind.LEASE)
    assert d.due(0.5) == []
    assert [e.task_id for e in d.due(3.0)] == ["t1", "t3", "t2"]
    for i in range(10):
        d.at(4.0, f"u{i}", 1, Kind.CANCEL)
    assert len(d.due(10.0, limit=4)) == 4 and len(d) == 7


def test_slow_start_grows_with_deliveries_and_halves_with_a_loss() -> None:
    s = Standing()
    assert s.allowance("a") == INITIAL_ALLOWANCE
    s.delivered("a", 8)
    assert s.allowance("a") == 2 * INITIAL_ALLOWANCE
    s.lost("a", "test", now=0.0)
    assert s.allowance("a") == INITIAL_ALLOWANCE and not s.benched("a", now=0.0)


def test_losses_in_a_row_bench_an_account_with_growing_backoff() -> None:
    s = Standing()
    for _ in range(BENCH_AFTER):
        s.lost("a", "dropped what it took", now=100.0)
    assert s.benched("a", now=100.0 + BENCH_SECONDS - 1)
    assert not s.benched("a", now=100.0 + BENCH_SECONDS + 1)
    for _ in range(BENCH_AFTER):
        s.lost("a", "again", now=200.0)
    assert s.benched("a", now=200.0 + 2 * BENCH_SECONDS - 1)  # doubled
    s.delivered("a")
    s.lost("a", "once", now=300.0)
    assert not s.benched("a", now=300.0)  # a delivery resets the run of losses
    assert not s.benched("someone-else", now=300.0)


def test_names_are_bound_to_the_first_account_for_good(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    names = Names(db)
    assert names.bind("gpu-box", "alice") and names.bind("gpu-box", "alice")
    assert not names.bind("gpu-box", "mallory")
    names.close()
    again = Names(db)  # a gateway restart on the same database
    assert again.owner("gpu-box") == "alice" and not again.bind("gpu-box", "mallory")
    again.close()
