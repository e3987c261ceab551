"""``progress(...)`` on a terminal against a real gateway: an uncomputed collection is persisted
and its real progress drawn (issue 10), and without a client it says what to do.

The notebook side (drawn once, widget bars) runs in a real kernel in ``test_panel.py``.
"""

from __future__ import annotations

import io
import sys

import cloudpickle
import dask
import dask.array as da
import pytest

from notebook_ext.progress import futures_of, progress

# slow_double travels by value: task processes cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_double(block):
    import time

    time.sleep(0.05)
    return block * 2


def test_an_uncomputed_collection_is_computed_with_real_progress(client) -> None:
    x = da.arange(60, chunks=10).map_blocks(slow_double, dtype=int)
    out = io.StringIO()
    shown = progress(x, notebook=False, file=out, timeout=60, client=client)
    line = out.getvalue()
    assert line.rstrip().endswith("s") and "6/6" in line and "100%" in line, line
    assert "error" not in line, line
    (persisted,) = shown.persisted
    assert all(f.done() for f in futures_of(persisted))
    assert int(persisted.sum().compute(scheduler=client)) == 2 * sum(range(60))
    assert "6/6 done" in repr(shown)


def test_dask_configured_scheduler_is_the_default_client(client) -> None:
    x = da.ones(20, chunks=5) + 1
    with dask.config.set(scheduler=client):
        shown = progress(x, notebook=False, file=io.StringIO(), timeout=60)
    assert len(shown.persisted) == 1 and shown.state.done == shown.state.total > 0


def test_without_a_client_it_says_how_to_get_one() -> None:
    with pytest.raises(ValueError, match=r"pass client=\.\.\., or persist it first"):
        progress(da.ones(4, chunks=2), notebook=False, file=io.StringIO())
