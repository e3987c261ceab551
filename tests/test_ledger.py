"""The ledger against its promises: conservation after every operation, idempotent settlement on
cumulative totals, exact integer fees, thread safety, and consistency across SIGKILL."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway.ledger import (
    ESCROW_TRANSITIONS,
    MICRO,
    EscrowEvent,
    EscrowState,
    EscrowStateError,
    InsufficientFunds,
    Ledger,
    LedgerInvariantError,
    LedgerTotals,
    escrow_transition,
    to_micro,
    to_tokens,
)

FAUCET = 10 * MICRO


def checked(ledger: Ledger) -> LedgerTotals:
    """Assert conservation from the rows, and that the cheap totals agree with it."""
    ledger.check()
    totals = ledger.totals()
    assert totals.conserved, totals
    return totals


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger(tmp_path / "ledger.sqlite", faucet_micro=FAUCET, fee_percent=2.5) as ledger:
        yield ledger
        checked(ledger)


def test_micro_conversion_is_exact_at_the_edge() -> None:
    assert to_micro(0.1) == 100_000
    assert to_micro(1) == MICRO
    assert to_micro(12345678.123456) == 12_345_678_123_456
    assert to_micro(-2.5) == -2_500_000
    assert to_tokens(1_500_000) == 1.5
    assert all(to_micro(to_tokens(m)) == m for m in (0, 1, 999_999, 123_456_789, 2**50))
    with pytest.raises(ValueError):
        to_micro(float("nan"))
    with pytest.raises(TypeError):
        to_micro("1")  # type: ignore[arg-type]


def test_database_is_in_wal_mode(ledger: Ledger) -> None:
    db = sqlite3.connect(ledger.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_faucet_is_credited_once(ledger: Ledger) -> None:
    assert ledger.ensure_account("alice") is True
    assert ledger.ensure_account("alice") is False
    assert ledger.balance("alice") == FAUCET
    assert ledger.balance("nobody") == 0
    assert checked(ledger) == LedgerTotals(minted=FAUCET, balances=FAUCET, escrow=0, fees=0)
    assert [t.reason for t in ledger.history("alice")] == ["faucet"]


def test_reserved_accounts_and_bad_amounts_are_refused(ledger: Ledger) -> None:
    for name in ("mint", "fees", "escrow:x", ""):
        with pytest.raises(ValueError):
            ledger.ensure_account(name)
    for bad in (0, -1, 1.5, True, 2**60):
        with pytest.raises((TypeError, ValueError)):
            ledger.mint("alice", bad)  # type: ignore[arg-type]
    assert checked(ledger).minted == 0


def test_mint_and_hold_then_final_settle(ledger: Ledger) -> None:
    ledger.mint("alice", 5 * MICRO)
    ledger.hold("t1", "alice", 4 * MICRO)
    assert ledger.open_escrows() == {"t1": 4 * MICRO}
    assert ledger.escrow_owner("t1") == "alice" and ledger.escrow_owner("t2") is None
    assert checked(ledger).escrow == 4 * MICRO
    result = ledger.settle("t1", "bob", 1 * MICRO, final=True)
    assert (result.charged_micro, result.provider_micro, result.fee_micro) == (
        MICRO, 975_000, 25_000)
    assert (result.refunded_micro, result.capped, result.state) == (3 * MICRO, False, "settled")
    assert ledger.balance("alice") == FAUCET + 5 * MICRO - MICRO
    assert ledger.balance("bob") == FAUCET + 975_000  # first sight as provider: faucet too
    assert ledger.earnings("bob") == 975_000 and ledger.earnings("alice") == 0
    assert ledger.open_escrows() == {} and ledger.escrow_owner("t1") == "alice"
    totals = checked(ledger)
    assert (totals.escrow, totals.fees) == (0, 25_000)
    reasons = [t.reason for t in ledger.history("alice", limit=10)]
    assert reasons == ["refund", "hold", "mint", "faucet"]


def test_refund_returns_everything_and_is_idempotent(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.hold("t1", "alice", 3 * MICRO)
    assert ledger.refund("t1") == 3 * MICRO
    assert ledger.refund("t1") == 0
    assert ledger.balance("alice") == FAUCET
    assert ledger.settle("t1", "bob", 0, final=True).state == "refunded"  # a replay: no error
    with pytest.raises(EscrowStateError):
        ledger.settle("t1", "bob", 1, final=False)  # usage after close is never paid
    with pytest.raises(EscrowStateError):
        ledger.refund("unknown")
    checked(ledger)


def test_refund_after_partial_payment_ends_settled(ledger: Ledger) -> None:
    ledger.hold("t1", "alice", 3 * MICRO)
    ledger.settle("t1", "bob", MICRO, final=False)
    assert ledger.refund("t1") == 2 * MICRO
    result = ledger.settle("t1", "bob", MICRO, final=True)
    assert (result.state, result.charged_micro, result.refunded_micro) == (
        "settled", MICRO, 2 * MICRO)
    assert ledger.balance("alice") == FAUCET - MICRO


def test_settle_is_idempotent_on_cumulative_totals(ledger: Ledger) -> None:
    ledger.hold("t1", "alice", 5 * MICRO)
    first = ledger.settle("t1", "bob", 2 * MICRO, final=False)
    assert ledger.settle("t1", "bob", 2 * MICRO, final=False) == first  # same: pays once
    assert ledger.settle("t1", "bob", MICRO, final=False) == first  # smaller: pays nothing
    assert ledger.earnings("bob") == first.provider_micro == 2 * MICRO - 50_000
    assert ledger.settle("t1", "bob", 3 * MICRO, final=False).charged_micro == 3 * MICRO
    final = ledger.settle("t1", "bob", 3 * MICRO, final=True)
    assert ledger.settle("t1", "bob", 3 * MICRO, final=True) == final
    assert ledger.settle("t1", "bob", 2 * MICRO, final=False) == final
    assert final.refunded_micro == 2 * MICRO and ledger.earnings("bob") == 3 * MICRO - 75_000
    assert len([t for t in ledger.history("bob") if t.reason == "pay"]) == 2


def test_settlement_is_capped_at_the_hold(ledger: Ledger) -> None:
    ledger.hold("t1", "alice", 2 * MICRO)
    assert ledger.settle("t1", "bob", MICRO, final=False).capped is False
    capped = ledger.settle("t1", "bob", 5 * MICRO, final=False)
    assert (capped.charged_micro, capped.capped) == (2 * MICRO, True)
    assert ledger.open_escrows() == {"t1": 0}
    final = ledger.settle("t1", "bob", 9 * MICRO, final=True)
    assert (final.charged_micro, final.refunded_micro, final.capped) == (2 * MICRO, 0, True)
    assert ledger.balance("alice") == FAUCET - 2 * MICRO


def test_zero_hold_is_a_free_task(ledger: Ledger) -> None:
    ledger.hold("free", "alice", 0)
    result = ledger.settle("free", "bob", 10, final=True)
    assert (result.charged_micro, result.capped, result.state) == (0, True, "settled")
    assert ledger.balance("alice") == FAUCET


@settings(max_examples=60, deadline=None)
@given(
    fee_percent=st.sampled_from([0.0, 0.01, 1.0, 2.5, 7.3333, 33.3, 99.99, 100.0]),
    steps=st.lists(st.integers(0, 3_000_001), min_size=1, max_size=12),
    hold=st.integers(0, 20 * MICRO),
)
def test_fee_split_is_exact_in_integers(fee_percent: float, steps: list[int], hold: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp) / "l.sqlite",
                                                      fee_percent=fee_percent) as ledger:
        ledger.mint("alice", 20 * MICRO)
        ledger.hold("t", "alice", hold)
        before, cumulative = ledger.settle("t", "bob", 0, final=False), 0
        for step in steps:
            cumulative += step
            after = ledger.settle("t", "bob", cumulative, final=False)
            charged = after.charged_micro - before.charged_micro
            paid = after.provider_micro - before.provider_micro
            assert charged == paid + after.fee_micro - before.fee_micro >= 0
            before = after
        charged = min(cumulative, hold)
        fee = int(Fraction(charged) * Fraction(str(fee_percent)) / 100)  # floor, no float
        assert (before.charged_micro, before.fee_micro) == (charged, fee)
        assert ledger.earnings("bob") == charged - fee
        assert ledger.balance("fees") == fee
        checked(ledger)


def test_provider_change_mid_task_pays_each_its_own_usage(ledger: Ledger) -> None:
    ledger.hold("t1", "alice", 5 * MICRO)
    ledger.settle("t1", "bob", 2 * MICRO, final=False)  # bob vanishes after 2 tokens of usage
    ledger.settle("t1", "carol", MICRO, final=False)  # the retry on carol starts from zero
    ledger.settle("t1", "bob", 2 * MICRO, final=False)  # a late duplicate from bob: nothing
    result = ledger.settle("t1", "carol", 4 * MICRO, final=True)  # only 3 left in escrow
    assert (result.charged_micro, result.refunded_micro, result.capped) == (5 * MICRO, 0, True)
    assert ledger.earnings("bob") == 2 * MICRO - 50_000
    assert ledger.earnings("carol") == 3 * MICRO - 75_000
    assert result.fee_micro == 125_000 == ledger.balance("fees")
    with pytest.raises(EscrowStateError):
        ledger.settle("t1", "dave", 1, final=False)


def test_insufficient_funds_leaves_everything_untouched(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.hold("t0", "alice", MICRO)
    snapshot = (ledger.totals(), ledger.balance("alice"), ledger.open_escrows(),
                ledger.history("alice"))
    with pytest.raises(InsufficientFunds) as caught:
        ledger.hold("t1", "alice", 50 * MICRO)
    message = str(caught.value)
    assert "has 9 tokens" in message and "needs 50 held" in message and "budget" in message
    assert "decompute-gateway mint alice" in message  # an id that the mint command accepts
    assert (caught.value.balance_micro, caught.value.needed_micro) == (9 * MICRO, 50 * MICRO)
    assert snapshot == (ledger.totals(), ledger.balance("alice"), ledger.open_escrows(),
                        ledger.history("alice"))
    assert ledger.escrow_owner("t1") is None
    ledger.hold("t1", "alice", MICRO)  # the task id was not burnt by the failed hold
    with pytest.raises(EscrowStateError):
        ledger.hold("t1", "alice", MICRO)  # a second escrow for one task is refused


def test_insufficient_funds_on_first_sight_creates_nothing(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(InsufficientFunds):
            ledger.hold("t", "stranger", 1)
        assert ledger.history("stranger") == [] and ledger.ensure_account("stranger") is True


def test_recover_refunds_every_open_escrow(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with Ledger(path, faucet_micro=FAUCET, fee_percent=10) as ledger:
        ledger.hold("a", "alice", 3 * MICRO)
        ledger.hold("b", "alice", 2 * MICRO)
        ledger.hold("c", "alice", MICRO)
        ledger.settle("a", "bob", MICRO, final=False)
        ledger.refund("c")
    with Ledger(path, faucet_micro=FAUCET, fee_percent=10) as ledger:  # a gateway restart
        assert ledger.open_escrows() == {"a": 2 * MICRO, "b": 2 * MICRO}
        assert sorted(ledger.recover()) == ["a", "b"]
        assert ledger.recover() == [] and ledger.open_escrows() == {}
        assert ledger.balance("alice") == FAUCET - MICRO
        assert ledger.settle("a", "bob", MICRO, final=True).state == "settled"
        assert checked(ledger) == LedgerTotals(2 * FAUCET, 2 * FAUCET - 100_000, 0, 100_000)


def test_check_detects_tampering(ledger: Ledger) -> None:
    ledger.ensure_account("alice")
    ledger.hold("t", "alice", MICRO)
    db = sqlite3.connect(ledger.path)
    with db:
        db.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'alice'")
    with pytest.raises(LedgerInvariantError, match="alice: cached balance"):
        ledger.check()
    with db:
        db.execute("UPDATE accounts SET balance = balance - 1 WHERE name = 'alice'")
        db.execute("UPDATE escrows SET state = 'refunded'")
    with pytest.raises(LedgerInvariantError, match="escrow t"):
        ledger.check()
    with db:
        db.execute("UPDATE escrows SET state = 'held'")
    db.close()


def test_escrow_transition_table_is_closed() -> None:
    assert set(ESCROW_TRANSITIONS) == set(EscrowState)
    for state, allowed in ESCROW_TRANSITIONS.items():
        for event in EscrowEvent:
            if event in allowed:
                assert escrow_transition("t", state, event) is allowed[event]
            else:
                with pytest.raises(EscrowStateError, match=f"escrow is {state}"):
                    escrow_transition("t", state, event)


def test_closed_ledger_refuses_work(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.close()
    ledger.close()
    with pytest.raises(Exception, match="closed"):
        ledger.balance("alice")


def test_concurrent_settlements_stay_exact(tmp_path: Path) -> None:
    """50 threads x 20 tasks, each settled with rising cumulative totals (with repeats), while a
    second Ledger object on the same file replays the same settlements from another thread."""
    path, hold, fee_percent = tmp_path / "l.sqlite", 1_000, 3.0
    ledger = Ledger(path, fee_percent=fee_percent)
    other = Ledger(path, fee_percent=fee_percent)
    rng = random.Random(7)
    tasks = {f"t{i}": (f"c{i % 50}", f"p{i % 7}") for i in range(1_000)}
    plans = {task: sorted(rng.randint(0, 1_300) for _ in range(5)) for task in tasks}
    for client in {c for c, _ in tasks.values()}:
        ledger.mint(client, 20 * hold)
    for task, (client, _) in tasks.items():
        ledger.hold(task, client, hold)
    errors: list[BaseException] = []

    def work(which: Ledger, names: list[str]) -> None:
        try:
            for step in range(6):
                for task in names:
                    cumulative = plans[task][min(step, 4)]
                    which.settle(task, tasks[task][1], cumulative, final=step == 5)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    names = list(tasks)
    threads = [threading.Thread(target=work, args=(ledger, names[i::50])) for i in range(50)]
    threads.append(threading.Thread(target=work, args=(other, names[::10])))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected_pay: dict[str, int] = {}
    expected_fees = 0
    for task, (_, provider) in tasks.items():
        charged = min(plans[task][-1], hold)
        fee = charged * 30_000 // MICRO
        expected_pay[provider] = expected_pay.get(provider, 0) + charged - fee
        expected_fees += fee
    for provider, pay in expected_pay.items():
        assert ledger.earnings(provider) == pay
    assert ledger.balance("fees") == expected_fees and ledger.open_escrows() == {}
    assert checked(ledger).minted == 50 * 20 * hold
    other.check()
    other.close()
    ledger.close()


_CRASH_CHILD = textwrap.dedent("""
    import random, sys
    from gateway.ledger import MICRO, InsufficientFunds, Ledger
    ledger = Ledger(sys.argv[1], faucet_micro=100 * MICRO, fee_percent=3.0)
    rng, run = random.Random(int(sys.argv[2])), sys.argv[2]
    for n in range(10**9):
        if n == 20:
            print("ready", flush=True)
        task, client = f"{run}-{n}", f"c{n % 5}"
        try:
            ledger.hold(task, client, rng.randint(0, 5 * MICRO))
        except InsufficientFunds:
            ledger.mint(client, 50 * MICRO)
            continue
        used = {}
        for _ in range(rng.randint(0, 4)):
            provider = rng.choice(["p0", "p1", "p2"])  # providers change mid-task
            used[provider] = used.get(provider, 0) + rng.randint(0, 2 * MICRO)
            ledger.settle(task, provider, used[provider], final=False)
        if used and rng.random() < 0.5:
            provider = rng.choice(list(used))
            ledger.settle(task, provider, used[provider], final=True)
        elif rng.random() < 0.7:
            ledger.refund(task)  # else: left open, for recover() to find
""")


def test_sigkill_at_random_points_never_creates_or_loses_a_token(tmp_path: Path) -> None:
    path, rng = tmp_path / "l.sqlite", random.Random(11)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run in range(6):
        child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(path), str(run)],
                                 stdout=subprocess.PIPE, env=env)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.2))
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        child.stdout.close()
        with Ledger(path, faucet_micro=100 * MICRO, fee_percent=3.0) as ledger:
            before = checked(ledger)
            held = ledger.open_escrows()
            owners = {task: ledger.escrow_owner(task) for task in held}
            expected = {c: ledger.balance(c) for c in owners.values() if c is not None}
            for task, amount in held.items():
                expected[owners[task]] += amount  # type: ignore[index]
            assert sorted(ledger.recover()) == sorted(held)
            after = checked(ledger)
            assert after.minted == before.minted and after.escrow == 0
            assert after.balances + after.fees == after.minted
            assert {c: ledger.balance(c) for c in expected} == expected


class LedgerMachine(RuleBasedStateMachine):
    """Random hold/settle/refund/mint/recover sequences against a plain model of the rules."""

    users = ("alice", "bob", "carol")
    tasks = ("t0", "t1", "t2", "t3")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.ledger: Ledger | None = None
        self.balances: dict[str, int] = {}
        self.minted = self.fees = 0
        self.escrows: dict[str, dict] = {}

    @initialize(fee_percent=st.sampled_from([0.0, 2.5, 33.3333, 100.0]),
                faucet=st.sampled_from([0, 2 * MICRO, 5 * MICRO]))
    def open_ledger(self, fee_percent: float, faucet: int) -> None:
        self.ppm, self.faucet = round(fee_percent * 10_000), faucet
        self.ledger = Ledger(Path(self.dir) / "l.sqlite", faucet_micro=faucet,
                             fee_percent=fee_percent)

    def teardown(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _see(self, account: str) -> bool:
        if account in self.balances:
            return False
        self.balances[account] = self.faucet
        self.minted += self.faucet
        return True

    @rule(account=st.sampled_from(users))
    def ensure(self, account: str) -> None:
        assert self.ledger.ensure_account(account) == self._see(account)

    @rule(account=st.sampled_from(users), amount=st.integers(1, 4 * MICRO))
    def mint(self, account: str, amount: int) -> None:
        self.ledger.mint(account, amount)
        self._see(account)
        self.balances[account] += amount
        self.minted += amount

    @rule(task=st.sampled_from(tasks), client=st.sampled_from(users),
          amount=st.integers(0, 3 * MICRO))
    def hold(self, task: str, client: str, amount: int) -> None:
        have = self.balances.get(client, self.faucet)
        if task in self.escrows:
            with pytest.raises(EscrowStateError):
                self.ledger.hold(task, client, amount)
        elif have < amount:
            with pytest.raises(InsufficientFunds):
                self.ledger.hold(task, client, amount)
        else:
            self.ledger.hold(task, client, amount)
            self._see(client)
            self.balances[client] -= amount
            self.escrows[task] = {"client": client, "held": amount, "charged": 0, "fee": 0,
                                  "refunded": 0, "state": "held", "usage": {}}

    @rule(task=st.sampled_from(tasks), provider=st.sampled_from(users),
          cumulative=st.integers(0, 6 * MICRO), final=st.sampled_from([False, False, True]))
    def settle(self, task: str, provider: str, cumulative: int, final: bool) -> None:
        e = self.escrows.get(task)
        reported, charged, fee = (e or {}).get("usage", {}).get(provider, (0, 0, 0))
        if e is None or (e["state"] != "held" and cumulative > reported):
            with pytest.raises(EscrowStateError):
                self.ledger.settle(task, provider, cumulative, final=final)
            return
        result = self.ledger.settle(task, provider, cumulative, final=final)
        if e["state"] == "held":
            reported = max(reported, cumulative)
            delta = min(reported - charged, e["held"] - e["charged"])
            new_fee = (charged + delta) * self.ppm // MICRO
            if delta:
                self._see(provider)
                self.balances[provider] += delta - (new_fee - fee)
                self.fees += new_fee - fee
                e["charged"] += delta
                e["fee"] += new_fee - fee
                fee = new_fee
            e["usage"][provider] = (reported, charged + delta, fee)
            if final:
                self._close(task, "settled")
        capped = any(r > c for r, c, _ in e["usage"].values())
        assert (result.charged_micro, result.fee_micro, result.refunded_micro, result.capped,
                result.state) == (e["charged"], e["fee"], e["refunded"], capped, e["state"])
        assert result.provider_micro == result.charged_micro - result.fee_micro

    def _close(self, task: str, state: str) -> int:
        e = self.escrows[task]
        left = e["held"] - e["charged"]
        self.balances[e["client"]] += left
        e["refunded"], e["state"] = left, state
        return left

    def _assert_closed_as(self, task: str, state: str) -> None:
        """A zero settle on a closed escrow is a replay that reports its state."""
        assert self.ledger.settle(task, "alice", 0, final=True).state == state

    @rule(task=st.sampled_from(tasks))
    def refund(self, task: str) -> None:
        e = self.escrows.get(task)
        if e is None:
            with pytest.raises(EscrowStateError):
                self.ledger.refund(task)
        elif e["state"] != "held":
            assert self.ledger.refund(task) == 0
        else:
            expected = self._close(task, "settled" if e["charged"] else "refunded")
            assert self.ledger.refund(task) == expected
        if e is not None:
            self._assert_closed_as(task, e["state"])

    @rule()
    def recover(self) -> None:
        open_ = sorted(t for t, e in self.escrows.items() if e["state"] == "held")
        assert sorted(self.ledger.recover()) == open_
        for task in open_:
            self._close(task, "settled" if self.escrows[task]["charged"] else "refunded")
            self._assert_closed_as(task, self.escrows[task]["state"])

    @invariant()
    def books_balance(self) -> None:
        totals = checked(self.ledger)
        escrow = sum(e["held"] - e["charged"] - e["refunded"] for e in self.escrows.values())
        assert totals == LedgerTotals(self.minted, sum(self.balances.values()), escrow, self.fees)
        assert {a: self.ledger.balance(a) for a in self.balances} == self.balances
        assert self.ledger.open_escrows() == {
            t: e["held"] - e["charged"] for t, e in self.escrows.items() if e["state"] == "held"}


LedgerMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30,
                                           deadline=None)
TestLedgerMachine = LedgerMachine.TestCase


# --------------------------------------------------------------------------- issue 9 / 10


def test_ledger_files_are_private(tmp_path: Path) -> None:
    """Tasks of local providers and other users of the host must not read who paid whom."""
    path = tmp_path / "private.sqlite"
    with Ledger(path, faucet_micro=FAUCET) as ledger:
        ledger.ensure_account("alice")
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f.exists():
                assert f.stat().st_mode & 0o777 == 0o600, f
    with Ledger(path) as ledger:  # an existing file, reopened, stays (or becomes) private
        assert path.stat().st_mode & 0o777 == 0o600


def test_check_reports_escrows_held_for_tasks_that_are_gone(ledger: Ledger) -> None:
    ledger.hold("s/live~1", "alice", MICRO)
    ledger.hold("s/gone~2", "alice", MICRO)
    ledger.check(live={"s/live~1", "s/gone~2"})
    with pytest.raises(LedgerInvariantError, match="s/gone~2 is held for a task that is finished"):
        ledger.check(live={"s/live~1"})
    ledger.refund("s/gone~2")
    ledger.check(live={"s/live~1"})
    ledger.refund("s/live~1")


def test_lookups_for_billing(ledger: Ledger) -> None:
    ledger.hold("s/a~1", "alice", 3 * MICRO)
    ledger.hold("s/b#1~2", "alice", 2 * MICRO)
    ledger.hold("other/c~3", "bob", MICRO)
    ledger.settle("s/a~1", "prov", MICRO, final=False)
    assert ledger.held_by("alice") == 4 * MICRO and ledger.held_by("nobody") == 0
    ids = [f"s/x{i}~{i}" for i in range(2000)] + ["s/a~1", "s/b#1~2"]  # more than one chunk
    assert ledger.held_among(ids) == {"s/a~1", "s/b#1~2"}
    assert ledger.charged_of(["s/a~1", "s/b#1~2", "s/none"]) == {"s/a~1": (MICRO, 25_000),
                                                                 "s/b#1~2": (0, 0)}
    assert ledger.has_tasks_under("s/") and not ledger.has_tasks_under("t/")
    # only a FINAL settlement (a delivered result) counts as paid for; a refund does not
    ledger.settle("s/a~1", "prov", MICRO, final=True)
    ledger.refund("s/b#1~2")
    assert ledger.settled_tasks(["s/a", "s/b#1", "other/c"]) == {"s/a"}
    assert ledger.settled_under("s/") == {"s/a"} and ledger.settled_under("t/") == set()
    ledger.recover()  # a restart's recovery is not a final settlement either
    assert ledger.settled_tasks(["other/c"]) == set()


def test_older_files_gain_the_task_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with Ledger(path, faucet_micro=FAUCET) as ledger:
        ledger.hold("s/a~1", "alice", MICRO)
        ledger.settle("s/a~1", "prov", MICRO, final=True)
    db = sqlite3.connect(path)
    with db:  # as an older gateway left it: no task column values
        db.execute("UPDATE escrows SET task = NULL")
    db.close()
    with Ledger(path) as ledger:
        assert ledger.settled_tasks(["s/a"]) == {"s/a"}
        checked(ledger)


def test_faucet_tops_up_a_known_account_left_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "dev.sqlite"
    with Ledger(path) as ledger:  # first run: no faucet
        assert ledger.ensure_account("alice") and ledger.balance("alice") == 0
        assert ledger.known("alice") and not ledger.known("bob")
    with Ledger(path, faucet_micro=FAUCET) as ledger:  # restarted with --faucet
        assert ledger.ensure_account("alice") is False
        assert ledger.balance("alice") == FAUCET
        ledger.ensure_account("alice")  # not zero: nothing more
        assert ledger.balance("alice") == FAUCET
        ledger.hold("t~1", "alice", FAUCET)  # zero available, but money held: no top-up
        ledger.ensure_account("alice")
        assert ledger.balance("alice") == 0
        ledger.refund("t~1")
        assert [t.reason for t in ledger.history("alice")][-1] == "faucet top-up"
        checked(ledger)


@pytest.mark.parametrize("usage", [
    {"cpu_seconds": float("nan")}, {"cpu_seconds": float("inf")}, {"cpu_seconds": -5.0},
    {"cpu_seconds": 1e300}, {"cpu_seconds": 1e18, "memory_gib_seconds": 1e18},
])
def test_any_usage_figure_settles_and_closes_the_escrow(tmp_path: Path,
                                                        usage: dict[str, float]) -> None:
    from gateway.billing import Billing
    from gateway.identity import Identity
    from gateway.protocol import Runtime, TaskSpec

    RUNTIME = Runtime(python="3.11", cloudpickle="3")  # noqa: N806
    with Ledger(tmp_path / "b.sqlite", faucet_micro=FAUCET) as ledger:
        billing = Billing(ledger, Identity.generate())
        for account in ("alice", "prov", "other"):  # what the shell loads before serving them
            ledger.ensure_account(account)
            billing.accounts.load(account, ledger.balance(account), 0)
        assert billing.hold([("t~1", "alice", TaskSpec(key="t", func="f", nb=0,
                                                       runtime=RUNTIME, budget=1.0))]) == [None]
        charge = billing.settle([("t~1", "prov", usage, {"cpu": 1.0, "memory": 1.0}, True)])[0]
        assert charge is not None and 0 <= charge.charged_micro <= MICRO
        # a final settlement the books refuse (the escrow is already closed) closes nothing
        # twice and answers with what the escrow charged
        again = billing.settle([("t~1", "other", {"cpu_seconds": 1.0}, {"cpu": 1.0}, True)])[0]
        assert again is not None and again.charged_micro == charge.charged_micro
        # the journal, applied as the accounting worker does, leaves the same books on disk
        _, ops = billing.accounts.take_journal()
        assert ledger.apply(ops, seen=ledger.last_transfer()).failed == {}
        assert ledger.open_escrows() == {}
        assert ledger.balance("alice") == billing.accounts.balance("alice")
        assert ledger.balance("prov") == billing.accounts.balance("prov")
        checked(ledger)
