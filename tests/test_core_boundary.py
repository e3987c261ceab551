"""The core's failure boundary (issue 11): a handler that raises fails the tasks it concerned,
returns their escrow and tells their clients; the core keeps serving everyone else.

The fault is real, not patched in: a ``Results`` message whose buffer count disagrees with its
headers (the shell's decoder refuses such a frame; the core, handed one, raises while splitting
the buffers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hub_money import CLIENT, FAUCET, client, commit, finish, gateway, provider, stop, submit

from gateway import protocol as p
from gateway.hub import Hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h, ledger = gateway(tmp_path / "ledger.sqlite")
    yield h
    commit(h)
    ledger.check(live=h.live_escrows())
    stop(h, ledger)


def test_a_handler_that_raises_fails_its_task_returns_the_escrow_and_serving_goes_on(
        hub: Hub) -> None:
    conn, prov = provider(hub, cpus=2)
    session, peer = client(hub)
    submit(hub, session, "broken", budget=2.0)
    submit(hub, session, "fine", budget=2.0)
    broken, fine = sorted(hub.tasks.values(), key=lambda t: t.key)
    assert hub.billing.accounts.held[CLIENT] == 4_000_000
    bad = p.Results(results=[p.Result(key=broken.task_id, status="finished", nb=2)])
    hub.contain("results", [broken.task_id], hub.results, conn, bad, [memoryview(b"one")])
    commit(hub)
    [failure] = peer.results()
    assert failure.key == "broken" and failure.error.type == "GatewayError"
    assert "internal error handling results" in failure.error.message
    assert "escrow returned" in failure.error.message
    cancels = [k for m, _ in prov.frames if isinstance(m, p.Cancel) for k in m.keys]
    assert cancels == [broken.task_id]  # the provider is told to stop it
    assert hub.billing.accounts.held[CLIENT] == 2_000_000  # "fine" alone still holds
    fine.assigned_at -= 1.0
    finish(hub, conn, fine.task_id, cpu=0.5)
    submit(hub, session, "later", budget=1.0)
    [later] = [t for t in hub.tasks.values() if t.key == "later"]
    later.assigned_at -= 1.0
    finish(hub, conn, later.task_id, cpu=0.25)
    done = {r.key: r for r in peer.results()[1:]}
    assert done["fine"].status == "finished" and done["fine"].receipt is not None
    assert done["later"].status == "finished" and done["later"].receipt is not None
    assert hub.billing.ledger.balance(CLIENT) == FAUCET - 750_000  # 0.5 + 0.25 tokens at 1/s
    assert hub.billing.ledger.open_escrows() == {}
