"""Issue 4's acceptance: tokens, escrow, budgets and receipts through real gateways and providers.

Every test runs real processes on loopback and reads the gateway's real SQLite ledger (WAL, so
reading beside the running gateway is safe). After every test, every ledger a test touched is
audited twice: by ``Ledger.check()``/``totals()`` and by independent SQL over the raw rows.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from conftest import (
    _SEEN,
    REPO,
    Gateway,
    ProviderProcess,
    descendants,
    http_get,
    kill_tree,
    start_gateway,
    wait_for,
)

from gateway.billing import result_hash
from gateway.identity import Identity
from gateway.ledger import Ledger, to_micro, to_tokens
from notebook_ext import BudgetExceeded, Client, InsufficientFunds, ProviderLost, verify_receipt

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks are defined here

PRICE_CPU = 0.5  # tokens per CPU-second
PRICE_MEMORY = 50.0  # tokens per GiB-second (the "mem" provider only)
FEE_PERCENT = 10
FEE_PPM = FEE_PERCENT * 10_000
FAUCET_MICRO = 1000 * 1_000_000  # conftest's start_gateway passes --faucet 1000

#: Every ledger file a test in this module touched: audited after each test.
_LEDGERS: set[Path] = set()


# --------------------------------------------------------------------------- task bodies


def burn(cpu_seconds: float) -> float:
    """Busy-loop until this process has used ``cpu_seconds`` of CPU (wall time may be more)."""
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < cpu_seconds:
        x += 1
    return time.process_time() - t0


def square(x: int) -> int:
    return x * x


# --------------------------------------------------------------------------- the books


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=30.0, isolation_level=None)


# Escrows are keyed per submission: "<session>/<key>~<nonce>", so a key can be reused.
OF_TASK = "(task_id = ? OR substr(task_id, 1, length(?) + 1) = ? || '~')"


def escrow(path: Path, task_id: str) -> dict[str, Any] | None:
    with contextlib.closing(_db(path)) as db:
        row = db.execute("SELECT task_id, client, held, charged, fee, refunded, state"
                         f" FROM escrows WHERE {OF_TASK}", (task_id,) * 3).fetchone()
    cols = ("task_id", "client", "held", "charged", "fee", "refunded", "state")
    return dict(zip(cols, row, strict=True)) if row else None


def moved(path: Path, task_id: str) -> dict[str, list[int]]:
    """reason -> the amounts of every transfer row of ``task_id``, in order."""
    out: dict[str, list[int]] = {}
    with contextlib.closing(_db(path)) as db:
        for reason, amount in db.execute("SELECT reason, amount FROM transfers"
                                         f" WHERE {OF_TASK} ORDER BY id", (task_id,) * 3):
            out.setdefault(reason, []).append(amount)
    return out


def books(path: Path) -> dict[str, int]:
    """Balances of every account and the minted total, from one Ledger."""
    with Ledger(path) as led:
        totals = led.totals()
        return {"minted": totals.minted, "fees": led.balance("fees"), "escrow": totals.escrow,
                "balances": totals.balances}


def audit(path: Path) -> None:
    """Conservation and per-escrow consistency: by the ledger itself, then by independent SQL
    over the raw rows (one snapshot, so it holds even beside a busy gateway)."""
    with Ledger(path) as led:
        led.check()
        totals = led.totals()
    assert totals.conserved, totals
    assert totals.minted == totals.balances + totals.escrow + totals.fees
    with contextlib.closing(_db(path)) as db:
        db.execute("BEGIN")  # one snapshot for every query below
        net = dict(db.execute(
            "SELECT a.name, COALESCE((SELECT SUM(amount) FROM transfers WHERE credit = a.name),"
            " 0) - COALESCE((SELECT SUM(amount) FROM transfers WHERE debit = a.name), 0)"
            " FROM accounts a"))
        accounts = {name: (kind, cached) for name, kind, cached in db.execute(
            "SELECT name, kind, balance FROM accounts")}
        minted = db.execute("SELECT COALESCE(SUM(amount), 0) FROM transfers"
                            " WHERE debit = 'mint'").fetchone()[0]
        escrows = db.execute("SELECT task_id, held, charged, fee, refunded, state"
                             " FROM escrows").fetchall()
        rows: dict[tuple[str, str], int] = {}
        for task_id, reason, amount in db.execute(
                "SELECT task_id, reason, SUM(amount) FROM transfers WHERE task_id IS NOT NULL"
                " GROUP BY task_id, reason"):
            rows[(task_id, reason)] = amount
        db.execute("COMMIT")
    assert minted == -net["mint"]
    assert all(net[name] == cached for name, (_, cached) in accounts.items())
    assert all(v >= 0 for k, v in net.items() if accounts[k][0] != "mint"), "negative balance"
    users = sum(v for k, v in net.items() if accounts[k][0] == "user")
    held = sum(v for k, v in net.items() if accounts[k][0] == "escrow")
    assert minted == users + held + net["fees"]  # conservation, from the rows alone
    assert held == sum(a - c - r for _, a, c, _, r, s in escrows if s == "held")
    for task_id, amount, charged, fee, refunded, state in escrows:
        got = {r: rows.get((task_id, r), 0) for r in ("hold", "pay", "fee", "refund")}
        assert got["hold"] == amount, (task_id, got)
        assert got["pay"] + got["fee"] == charged and got["fee"] == fee, (task_id, got)
        assert got["refund"] == refunded, (task_id, got)
        assert net["escrow:" + task_id] == amount - charged - refunded
        if state == "held":
            assert refunded == 0, task_id
        else:  # closed: every micro-token held went to a provider, the fees or back
            assert charged + refunded == amount, (task_id, state)
            assert state in ("settled", "refunded"), (task_id, state)
            assert state == "settled" or charged == 0, (task_id, state, charged)


@pytest.fixture(autouse=True)
def conservation() -> Iterator[None]:
    """Acceptance 2: after every test, each ledger it touched is exactly conserved."""
    yield
    for path in sorted(_LEDGERS):
        if path.exists():
            audit(path)


# --------------------------------------------------------------------------- processes


def start_priced_provider(gw: Gateway, tmp: Path, name: str, cpus: int,
                          *prices: str) -> ProviderProcess:
    """conftest's ``start_provider`` with price flags (``--price-cpu 0.5`` ...)."""
    home = tmp / f"provider-{name}"
    home.mkdir(parents=True, exist_ok=True)
    log = tmp / f"provider-{name}.log"
    env = dict(os.environ, DECOMPUTE_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "provider", gw.url, "--name", name, "--cpus", str(cpus),
           *prices]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    _SEEN.append(psutil.Process(proc.pid))
    return ProviderProcess(proc, name, log)


def sigkill_gateway(gw: Gateway) -> None:
    """SIGKILL the gateway process (and whatever it started, after it)."""
    tree = descendants(gw.proc.pid)
    gw.proc.kill()
    gw.proc.wait(10)
    kill_tree(tree)


def metric(gw: Gateway, name: str) -> float:
    status, body = http_get(gw.port, "/metrics")
    assert status == 200, body
    for line in body.splitlines():
        if line.startswith(f"decompute_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name} in /metrics")


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway taking a 10 % fee, with provider "cpu" (0.5 tokens/CPU-s) and provider "mem"
    (0.5 tokens/CPU-s and 50 tokens/GiB-s: every task costs something, however short)."""
    tmp = tmp_path_factory.mktemp("priced")
    gw = start_gateway(tmp, extra=("--fee-percent", str(FEE_PERCENT)))
    _LEDGERS.add(tmp / "ledger.sqlite")
    provs = [start_priced_provider(gw, tmp, "cpu", 2, "--price-cpu", str(PRICE_CPU)),
             start_priced_provider(gw, tmp, "mem", 2, "--price-cpu", str(PRICE_CPU),
                                   "--price-memory", str(PRICE_MEMORY))]
    try:
        gw.wait_providers(2)
        yield gw
    finally:
        for prov in provs:
            prov.stop()
        gw.stop()


def ledger_of(gw: Gateway) -> Path:
    return gw.home.parent / "ledger.sqlite"


def task_id(client: Client, fut: Any) -> str:
    return f"{client.session}/{fut.key}"


# --------------------------------------------------------------------------- 1. exact settlement


def test_cpu_task_costs_its_metered_cpu_seconds_and_moves_exact_amounts(
        priced: Gateway, tmp_path: Path) -> None:
    db = ledger_of(priced)
    with Client(priced.url, home=tmp_path / "client", stream_output=False) as client:
        provider = next(p for p in client.providers() if p.name == "cpu")
        with Ledger(db) as led:
            client_before = led.balance(client.account)
            earned_before = led.earnings(provider.account)
            provider_before = led.balance(provider.account)
            fees_before = led.balance("fees")
        assert client_before == FAUCET_MICRO
        assert client.balance() == to_tokens(FAUCET_MICRO)

        fut = client.submit(burn, 2.0, budget=5, providers=["cpu"])
        assert fut.result(60) >= 2.0
        cpu = fut.usage["cpu_seconds"]
        expected = cpu * PRICE_CPU
        print(f"\nmeasured cpu_seconds={cpu:.6f} cost={fut.cost:.6f} "
              f"cpu*price={expected:.6f} ratio={fut.cost / expected:.6f}")
        assert 1.95 <= cpu < 2.5, fut.usage  # clock ticks are 10 ms
        assert abs(fut.cost - expected) <= 0.10 * expected
        assert abs(fut.cost - 2.0 * PRICE_CPU) <= 0.10 * 2.0 * PRICE_CPU

        receipt = fut.receipt
        assert receipt is not None and verify_receipt(receipt, client.gateway_key)
        assert receipt["task_id"].split("~")[0] == task_id(client, fut)
        assert receipt["client"] == client.account and receipt["provider"] == provider.account
        assert receipt["prices"] == {"cpu": PRICE_CPU, "memory": 0.0, "gpu": 0.0}
        row = escrow(db, receipt["task_id"])
        assert row is not None
        charged, fee = row["charged"], row["fee"]
        assert (row["state"], row["client"], row["held"]) == ("settled", client.account,
                                                              to_micro(5))
        assert charged == receipt["amount_micro"] == to_micro(fut.cost)
        assert abs(charged - round(receipt["usage"]["cpu_seconds"] * PRICE_CPU * 1e6)) <= 1
        assert fee == receipt["fee_micro"] == charged * FEE_PPM // 1_000_000  # floor
        assert row["refunded"] == row["held"] - charged

        rows = moved(db, receipt["task_id"])
        assert rows["hold"] == [to_micro(5)] and rows["refund"] == [row["refunded"]]
        paid, fees = sum(rows["pay"]), sum(rows.get("fee", []))
        assert paid + fees == charged and fees == fee

        with Ledger(db) as led:
            assert client_before - led.balance(client.account) == charged
            assert led.earnings(provider.account) - earned_before == charged - fee
            assert led.balance(provider.account) - provider_before == charged - fee
            assert led.balance("fees") - fees_before == fee
            assert client.balance() == to_tokens(led.balance(client.account))


# --------------------------------------------------------------------------- 3. budget


def test_budget_stops_the_task_and_charges_at_most_the_budget(priced: Gateway,
                                                              tmp_path: Path) -> None:
    db = ledger_of(priced)
    with Client(priced.url, home=tmp_path / "client", stream_output=False) as client:
        before = client.balance()
        start = time.monotonic()
        # 0.6 tokens: more than one billing interval (1 CPU-s, 0.5 tokens) at this price, so the
        # provider may take it; far less than the 2.5 tokens the whole task would cost
        fut = client.submit(burn, 5.0, budget=0.6, providers=["cpu"], retries=0)
        with pytest.raises(BudgetExceeded, match="budget"):
            fut.result(60)
        elapsed = time.monotonic() - start
        tid = task_id(client, fut)
        row = wait_for(lambda: (e := escrow(db, tid)) and e["state"] != "held" and e, 30,
                       message="final settlement of the stopped task")
        with contextlib.closing(_db(db)) as con:
            reported = con.execute(f"SELECT SUM(reported) FROM escrow_usage WHERE {OF_TASK}",
                                   (tid,) * 3).fetchone()[0]
        print(f"\nbudget stop after {elapsed:.2f} s wall; charged {row['charged']} micro of "
              f"{row['held']}; last reported usage worth {reported} micro "
              f"({reported / 1e6 / PRICE_CPU:.2f} CPU-s)")
        # a 5 CPU-second task, stopped long before it could finish (wall time also counts a
        # fresh sandboxed worker starting for this new account, so the CPU is what tells)
        assert elapsed < 15.0
        assert reported / 1e6 / PRICE_CPU < 2.5  # the task process stopped burning CPU
        assert row["held"] == to_micro(0.6)
        assert 0 < row["charged"] <= to_micro(0.6)
        assert row["state"] == "settled" and row["refunded"] == row["held"] - row["charged"]
        assert fut.cost <= 0.6
        assert to_micro(before) - to_micro(client.balance()) == row["charged"]
        # the stop is a settlement too: it comes with its signed receipt
        assert fut.receipt is not None and verify_receipt(fut.receipt, client.gateway_key)
        assert fut.receipt["amount_micro"] == row["charged"]


# --------------------------------------------------------------------------- 4. no funds


def test_insufficient_funds_is_refused_at_submit_and_nothing_runs(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "poor", local_providers=1,
                       extra=("--faucet", "1", "--local-price-cpu", str(PRICE_CPU)))
    db = tmp_path / "poor" / "ledger.sqlite"
    _LEDGERS.add(db)
    try:
        with Client(gw.url, home=tmp_path / "client", stream_output=False) as client:
            assert client.balance() == 1.0
            submitted = metric(gw, "tasks_submitted_total")
            workers = gw.worker_pids()
            # refused by the client at submit (it knows the balance), else by the gateway
            with pytest.raises(InsufficientFunds, match="needs? 5"):
                client.submit(burn, 1.0, budget=5, key="poor").result(30)
            assert metric(gw, "tasks_submitted_total") == submitted == 0
            assert gw.health()["tasks"] == {"pending": 0, "running": 0}
            tid = f"{client.session}/poor"
            assert escrow(db, tid) is None and moved(db, tid) == {}
            assert client.balance() == 1.0
            with Ledger(db) as led:
                assert led.balance(client.account) == to_micro(1)
                assert [t.reason for t in led.history(client.account)] == ["faucet"]
            assert gw.worker_pids() == workers  # no worker was started or replaced for it
            # what the account can afford still runs
            assert client.submit(square, 7, budget=0.5).result(30) == 49
            assert metric(gw, "tasks_submitted_total") == 1
    finally:
        gw.stop()


# --------------------------------------------------------------------------- 5. live cost


def test_cost_grows_while_a_long_task_runs(priced: Gateway, tmp_path: Path) -> None:
    with Client(priced.url, home=tmp_path / "client", stream_output=False) as client:
        fut = client.submit(burn, 3.0, budget=5, providers=["cpu"])
        seen: list[float] = []
        cpu_seen: list[float] = []
        while not fut.done():
            cost, cpu = fut.cost, fut.usage.get("cpu_seconds", 0.0)
            if not fut.done():
                if cost and (not seen or seen[-1] != cost):
                    seen.append(cost)
                if cpu and (not cpu_seen or cpu_seen[-1] != cpu):
                    cpu_seen.append(cpu)
            time.sleep(0.02)
        fut.result()
        print(f"\nlive costs seen: {seen}; final {fut.cost}")
        assert len(seen) >= 3, seen
        assert seen == sorted(seen) and all(c <= fut.cost for c in seen)
        assert cpu_seen == sorted(cpu_seen) and len(cpu_seen) >= 3


# --------------------------------------------------------------------------- 6. gateway crash


def test_sigkilled_gateway_restarts_on_the_same_ledger_without_creating_or_losing_tokens(
        tmp_path: Path) -> None:
    tmp = tmp_path / "crash"
    db = tmp / "ledger.sqlite"
    extra = ("--fee-percent", str(FEE_PERCENT))
    gw = start_gateway(tmp, extra=extra)
    _LEDGERS.add(db)
    provs = [start_priced_provider(gw, tmp, "solo", 1, "--price-cpu", str(PRICE_CPU))]
    gw2: Gateway | None = None
    try:
        gw.wait_providers(1)
        key = gw.health()["gateway_key"]
        with Client(gw.url, home=tmp / "client", stream_output=False,
                    reconnect_for=2.0) as client:
            running = client.submit(burn, 60.0, budget=50, key="running", retries=0)
            queued = client.submit(burn, 60.0, budget=7, key="queued", retries=0)
            wait_for(lambda: running.cost >= 0.1, 60, message="partial settlements")
            assert queued.status == "pending"
            sigkill_gateway(gw)
            with pytest.raises((ConnectionError, ProviderLost)):
                running.result(30)
        ran, waited = task_id(client, running), task_id(client, queued)

        # the books as the SIGKILL left them: consistent, both escrows still open
        audit(db)
        at_kill = books(db)
        r0, q0 = escrow(db, ran), escrow(db, waited)
        assert r0 is not None and q0 is not None
        assert (r0["state"], q0["state"]) == ("held", "held")
        assert r0["charged"] > 0 and q0["charged"] == 0
        with Ledger(db) as led:
            client_at_kill = led.balance(client.account)
        assert client_at_kill == FAUCET_MICRO - r0["held"] - q0["held"]

        # same --db, same DECOMPUTE_HOME: recovery closes both escrows before serving
        gw2 = start_gateway(tmp, extra=extra)
        assert gw2.health()["gateway_key"] == key
        r1, q1 = escrow(db, ran), escrow(db, waited)
        assert r1 is not None and q1 is not None
        # paid for what it used up to the crash, the rest refunded: settled, not also refunded
        assert r1["state"] == "settled"
        assert (r1["charged"], r1["fee"]) == (r0["charged"], r0["fee"])
        assert r1["refunded"] == r1["held"] - r1["charged"]
        rows = moved(db, ran)
        assert rows["hold"] == [r1["held"]] and rows["refund"] == [r1["refunded"]]
        assert sum(rows["pay"]) + sum(rows.get("fee", [])) == r1["charged"]
        # never ran: refunded in full, nothing paid
        assert (q1["state"], q1["charged"], q1["refunded"]) == ("refunded", 0, q1["held"])
        assert moved(db, waited) == {"hold": [q1["held"]], "refund": [q1["held"]]}

        after = books(db)
        assert after["minted"] == at_kill["minted"]  # no token created
        assert after["escrow"] == 0 and after["fees"] == at_kill["fees"]
        with Ledger(db) as led:
            assert led.open_escrows() == {}
            assert led.balance(client.account) == FAUCET_MICRO - r1["charged"]
        with Client(gw2.url, home=tmp / "client", stream_output=False) as again:
            assert again.account == client.account
            assert again.balance() == to_tokens(FAUCET_MICRO - r1["charged"])
        assert books(db)["minted"] == at_kill["minted"]  # a known account gets no faucet again
    finally:
        for prov in provs:
            prov.stop()
        gw.stop()
        if gw2 is not None:
            gw2.stop()


# --------------------------------------------------------------------------- 7. receipts


def test_receipt_of_a_real_task_verifies_and_any_tampering_fails(priced: Gateway,
                                                                 tmp_path: Path) -> None:
    with Client(priced.url, home=tmp_path / "client", stream_output=False) as client:
        fut = client.submit(burn, 0.1, budget=1, providers=["cpu"])
        fut.result(30)
        receipt = fut.receipt
    assert receipt is not None
    key = priced.health()["gateway_key"]
    assert key == client.gateway_key
    assert set(receipt) == {"entry", "index", "proof", "head"}  # a leaf of the receipt log
    assert verify_receipt(receipt, key)
    assert verify_receipt(json.loads(json.dumps(receipt)), bytes.fromhex(key))
    settled = json.loads(receipt["entry"])
    assert settled["amount_micro"] > 0 and settled["client"] == client.account
    assert settled["outcome"] == result_hash(cf.Future.result(fut).buffers)
    assert settled["providers"][0]["result_hash"] == settled["outcome"]
    row = escrow(ledger_of(priced), settled["task_id"])
    assert row is not None
    assert (row["charged"], row["fee"]) == (settled["amount_micro"], settled["fee_micro"])

    def forged_entry(change: Any) -> dict[str, Any]:
        entry = copy.deepcopy(settled)
        change(entry)
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        return {**copy.deepcopy(dict(receipt)), "entry": text}

    def forged_head(**changes: Any) -> dict[str, Any]:
        forged = copy.deepcopy(dict(receipt))
        forged["head"].update(changes)
        return forged

    def paid_less(e: dict) -> None:
        e["amount_micro"] -= 1
        e["fee_micro"] -= 1  # still adds up, but it is not the leaf that was logged

    def usage_halved(e: dict) -> None:
        e["providers"][0]["usage"]["cpu_seconds"] /= 2

    sig = receipt["head"]["signature"]
    flipped = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
    root = receipt["head"]["root"]
    for forged in (forged_entry(paid_less), forged_entry(usage_halved),
                   forged_entry(lambda e: e.update(client="c" * 64)),
                   forged_entry(lambda e: e.update(outcome="0" * 64)),
                   forged_entry(lambda e: e.update(amount_micro=e["amount_micro"] + 1)),
                   {**receipt, "index": receipt["index"] + 1},
                   {**receipt, "proof": [*receipt["proof"], "00" * 32]},
                   forged_head(signature=flipped), forged_head(size=receipt["head"]["size"] + 1),
                   forged_head(root=("0" if root[0] != "0" else "1") + root[1:]),
                   forged_head(time=receipt["head"]["time"] + 1)):
        assert not verify_receipt(forged, key), forged
    other = Identity.generate()
    assert not verify_receipt(receipt, other.account)
    assert verify_receipt(receipt, key)  # the original was never touched


# --------------------------------------------------------------------------- 8. 1,000 at once


def test_a_thousand_concurrent_settlements_keep_the_ledger_exact(priced: Gateway,
                                                                 tmp_path: Path) -> None:
    db = ledger_of(priced)
    clients = [Client(priced.url, home=tmp_path / f"client-{i}", stream_output=False)
               for i in range(4)]
    try:
        provider = next(p for p in clients[0].providers() if p.name == "mem")
        with Ledger(db) as led:
            before = {c.account: led.balance(c.account) for c in clients}
            earned_before = led.earnings(provider.account)
            fees_before = led.balance("fees")
        # one account after another: the settlements interleave on the gateway all the same
        # (results, heartbeats, holds of the next batch), but the provider does not need a fresh
        # sandboxed worker for nearly every task, as four accounts' tasks placed in turn would
        # (worker start-up, not the ledger, would then set this test's pace)
        batches = []
        for c in clients:
            batches.append(c.map(square, range(250), providers=["mem"], chunksize=1))
            assert [f.result(120) for f in batches[-1]] == [i * i for i in range(250)]

        total = 0
        with Ledger(db) as led:
            for client, batch in zip(clients, batches, strict=True):
                receipts = [f.receipt for f in batch]
                assert all(r is not None and verify_receipt(r, client.gateway_key)
                           for r in receipts)
                spent = sum(r["amount_micro"] for r in receipts)
                assert before[client.account] - led.balance(client.account) == spent
                rows = [escrow(db, r["task_id"]) for r in receipts]
                assert sum(r["charged"] for r in rows) == spent
                for r, row in zip(receipts, rows, strict=True):
                    assert (row["charged"], row["fee"]) == (r["amount_micro"], r["fee_micro"])
                    assert row["fee"] == row["charged"] * FEE_PPM // 1_000_000
                    assert row["state"] == "settled" and row["refunded"] == row["held"] - row[
                        "charged"]
                total += spent
            earned = led.earnings(provider.account) - earned_before
            fees = led.balance("fees") - fees_before
        amounts = sorted(f.receipt["amount_micro"] for b in batches for f in b)
        print(f"\n1000 tasks: {total} micro charged (min {amounts[0]}, median {amounts[500]}, "
              f"max {amounts[-1]}), provider earned {earned}, fees {fees}")
        assert amounts[0] > 0  # a non-zero price: every one of the 1,000 tasks was settled
        assert earned + fees == total
    finally:
        for client in clients:
            client.close()


# --------------------------------------------------------------------------- 9. minting


def run_mint(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "mint", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_mint_takes_only_a_full_id_of_a_known_account(tmp_path: Path) -> None:
    db = tmp_path / "mint.sqlite"
    _LEDGERS.add(db)
    known = Identity.generate().account
    with Ledger(db) as led:
        led.ensure_account(known)
    for bad in (known[:16], known + "00", "not-an-account", "g" * 64):
        out = run_mint(bad, "5", "--db", str(db), cwd=tmp_path)
        assert out.returncode == 2 and "64 hex digits" in out.stderr, out.stderr
    stranger = Identity.generate().account
    out = run_mint(stranger, "5", "--db", str(db), cwd=tmp_path)
    assert out.returncode == 2 and "unknown to the ledger" in out.stderr, out.stderr
    out = run_mint(known, "-1", "--db", str(db), cwd=tmp_path)
    assert out.returncode == 2 and "positive" in out.stderr
    out = run_mint(known, "5", "--db", str(tmp_path / "nowhere.sqlite"), cwd=tmp_path)
    assert out.returncode == 2 and "no ledger" in out.stderr
    assert not (tmp_path / "nowhere.sqlite").exists()
    out = run_mint(known.upper(), "5", "--db", str(db), cwd=tmp_path)
    assert out.returncode == 0 and "balance now 5" in out.stdout, out.stderr
    with Ledger(db) as led:
        assert led.balance(known) == to_micro(5) and not led.known(stranger)
