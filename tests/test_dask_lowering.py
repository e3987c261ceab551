"""The Dask lowering as a pure transformation, and progress, with no network.

A :class:`LocalGraphClient` stands in for the network: its ``submit_graph`` runs each GraphTask
the way a provider does (function and arguments through the client's real cloudpickle
serializers, then ``fn(deps, *args, **kwargs)``), in the order given, and fails the test if a
task arrives before its dependencies. Every answer is compared with ``scheduler="sync"``.
"""

from __future__ import annotations

import io
import operator
import subprocess
import sys
import threading
from collections.abc import Iterator

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask._task_spec import Alias, DataNode, Task, TaskRef
from dask.local import get_sync

from notebook_ext import dask_integration as di
from notebook_ext.client import GraphTask
from notebook_ext.futures import Future
from notebook_ext.progress import ProgressState, TextProgress, futures_of, progress, text_line
from notebook_ext.serialize import dumps_args, dumps_function

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Boom(Exception):
    """A user exception type: must surface as itself, as get_sync raises it."""


def inc(x):
    return x + 1


def fail(x):
    raise Boom(f"boom {x}")


class LocalGraphClient:
    """``submit_graph`` executed in this process, task by task, through real serialization."""

    asynchronous = False

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.calls: list[tuple[list[GraphTask], set[str], dict]] = []
        self.cancelled: list[str] = []

    def first_failure(self, token):
        return None  # each failure is raised by the future it belongs to

    def submit_graph(self, tasks, send=(), **opts):
        self.calls.append((list(tasks), set(send), opts))
        assert len({dumps_function(t.fn)[0] for t in tasks}) <= 1, "one shared runner"
        futures = {}
        for t in tasks:
            missing = [d for d in t.deps if d not in self.values]
            assert not missing, f"{t.key} submitted before its dependencies {missing}"
            assert isinstance(t.key, str) and len(t.key) <= 256
            fn = cloudpickle.loads(dumps_function(t.fn)[1])
            payload = dumps_args(t.args, t.kwargs)
            args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])
            fut = futures[t.key] = Future(self, t.key)
            try:
                for d in t.deps:  # a failed input fails its dependents with the same error
                    if isinstance(self.values[d], BaseException):
                        raise self.values[d]
                value = fn({d: self.values[d] for d in t.deps}, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - stored as the task's outcome
                self.values[t.key] = exc
                fut.set_exception(exc)
            else:
                self.values[t.key] = value
                fut.set_result(value)
        return futures

    def _cancel_keys(self, keys):
        self.cancelled += keys

    def get(self, dsk, keys, **kwargs):
        return di.get(self, dsk, keys, **kwargs)

    def compute(self, collections, **kwargs):
        return di.compute(self, collections, **kwargs)

    def persist(self, collections, **kwargs):
        return di.persist(self, collections, **kwargs)


@pytest.fixture
def client() -> Iterator[LocalGraphClient]:
    # an open Client makes task shuffles Dask's default (not the import); this one is a fake
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        yield LocalGraphClient()


def frames() -> tuple[dd.DataFrame, dd.DataFrame]:
    left = pd.DataFrame({"k": np.arange(40) % 7, "v": np.arange(40.0)})
    right = pd.DataFrame({"k": np.arange(7), "w": np.arange(7) * 10})
    return dd.from_pandas(left, npartitions=4), dd.from_pandas(right, npartitions=2)


def same(a, b) -> None:
    if isinstance(a, (pd.DataFrame, pd.Series)):  # partition order is not part of the answer
        a, b = (pd.DataFrame(f).reset_index(drop=f.index.name is None) for f in (a, b))
        a, b = (f.sort_values(list(f.columns)).reset_index(drop=True) for f in (a, b))
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b)
    else:
        assert a == b or np.allclose(a, b)


# --------------------------------------------------------------------------- collections


def test_array_reduction_and_matmul(client):
    x = da.random.RandomState(0).random((60, 60), chunks=20)
    for expr in (x.sum(), x @ x.T, (x + 1).mean(axis=0)):
        same(dask.compute(expr, scheduler=client)[0], dask.compute(expr, scheduler="sync")[0])


def test_dataframe_groupby_agg_and_merge(client):
    left, right = frames()
    agg = left.groupby("k").v.agg(["sum", "max"])
    merged = left.merge(right, on="k")
    for expr in (agg, merged):
        same(expr.compute(scheduler=client), expr.compute(scheduler="sync"))


def test_bag_foldby_and_delayed_diamond(client):
    bag = db.from_sequence(range(50), npartitions=5)
    fold = bag.foldby(lambda v: v % 3, operator.add, 0)
    assert sorted(fold.compute(scheduler=client)) == sorted(fold.compute(scheduler="sync"))
    a = dask.delayed(inc)(1)
    b, c = dask.delayed(inc)(a), dask.delayed(operator.mul)(a, 3)
    d = dask.delayed(operator.add)(b, c)
    assert d.compute(scheduler=client) == d.compute(scheduler="sync") == 9


@pytest.mark.filterwarnings("ignore:Computing mixed collections")
def test_every_entry_point_and_a_mix(client):
    x = da.arange(20, chunks=5)
    left, _ = frames()
    bag = db.from_sequence([1, 2, 3], npartitions=2).map(inc)
    mixed = (x.sum(), left.v.sum(), bag.sum(), dask.delayed(inc)(1), "plain")
    assert dask.compute(*mixed, scheduler=client) == dask.compute(*mixed, scheduler="sync")
    assert x.sum().compute(scheduler=client) == 190
    with dask.config.set(scheduler=client):
        assert dask.compute(x.max())[0] == 19
        (persisted,) = dask.persist(x)
    assert [f.key for f in futures_of(persisted)]
    assert client.calls[-1][1] == set()  # persisted chunks are kept, not sent back


def test_compute_returns_futures_and_passes_values_through(client):
    x = da.arange(10, chunks=5)
    fut = client.compute(x.sum())
    assert isinstance(fut, Future) and fut.result() == 45
    futs = client.compute([x.sum(), x.max(), 7])
    assert [f.result() for f in futs[:2]] == [45, 9] and futs[2] == 7
    assert client.compute([x.sum(), [x.max(), 1]], sync=True) == [45, [9, 1]]
    assert client.calls[-1][1] == set()  # results stay on their provider until asked


def test_persist_then_compute_depends_on_the_persisted_keys(client):
    x = da.random.RandomState(1).random((40, 40), chunks=10) * 2
    xp = client.persist(x)
    held = futures_of(xp)
    assert len(held) == 16 and all(f.done() for f in held)
    n_before = len(client.calls)
    assert np.isclose(xp.sum().compute(scheduler=client), x.sum().compute(scheduler="sync"))
    tasks = client.calls[n_before][0]
    deps = {d for t in tasks for d in t.deps}
    assert {f.key for f in held} <= deps  # read by key from the providers, not recomputed
    assert all(t.deps for t in tasks)  # no chunk was recomputed: every root is a persisted key
    left, _ = frames()
    lp = client.persist(left)
    same(lp.groupby("k").v.sum().compute(scheduler=client),
         left.groupby("k").v.sum().compute(scheduler="sync"))
    d = client.persist(dask.delayed(inc)(1))
    assert (d + 1).compute(scheduler=client) == 3


# --------------------------------------------------------------------------- get


def test_get_legacy_and_task_spec_graphs_with_nested_keys(client):
    legacy = {"a": 1, "b": (inc, "a"), "c": (operator.add, "a", "b"), "d": ["a", "b", (inc, "c")],
              ("x", 0): (sum, ["a", "b"]), ("x", 1): (inc, ("x", 0))}
    spec = {"a": DataNode("a", 1), "b": Task("b", inc, TaskRef("a")),
            "c": Task("c", operator.add, TaskRef("a"), TaskRef("b")), "e": Alias("e", "c")}
    for dsk in (legacy, spec):
        for keys in ("c", ["a", "c"], [["a", "b"], ["c"]], [[("x", 1)]] if dsk is legacy else []):
            assert client.get(dsk, keys) == get_sync(dsk, keys)
    assert client.get(legacy, "d") == get_sync(legacy, "d") == [1, 2, 4]
    d = dask.delayed(operator.add)(dask.delayed(inc)(1), 10)  # a HighLevelGraph
    assert client.get(d.__dask_graph__(), [d.key]) == get_sync(d.__dask_graph__(), [d.key])


def test_get_errors_as_get_sync_raises_them(client):
    dsk = {"a": 1, "b": (fail, "a"), "c": (inc, "b"), "z": (operator.truediv, 1, 0)}
    for keys in ("c", "z", ["a", "c"]):
        with pytest.raises(Exception) as local:
            get_sync(dsk, keys)
        with pytest.raises(type(local.value), match=str(local.value)):
            client.get(dsk, keys)
    with pytest.raises(KeyError):
        client.get(dsk, "nowhere")
    missing = {"a": Task("a", inc, TaskRef("missing"))}
    with pytest.raises(ValueError, match="Missing dependency"):
        get_sync(missing, "a")
    with pytest.raises(ValueError, match="Missing dependency"):
        client.get(missing, "a")
    with pytest.raises(TypeError, match="unexpected keyword"):
        client.get(dsk, "a", budjet=1)


def test_a_disk_shuffle_is_refused_with_the_fix(client):
    """partd shuffles share one local directory: they cannot span providers."""
    bag = db.from_sequence(range(20), npartitions=4).groupby(lambda v: v % 2, shuffle="disk")
    with pytest.raises(ValueError, match="shuffle.method': 'tasks'"):
        bag.compute(scheduler=client)
    left, right = frames()  # the fixture's default, as an open Client's
    assert dask.config.get("dataframe.shuffle.method") == "tasks"
    merged = left.merge(right, on="k", npartitions=3)
    same(merged.compute(scheduler=client), merged.compute(scheduler="sync"))


def test_options_reach_every_task(client):
    assert client.get({"a": (inc, 1)}, "a", budget=2.0, retries=0) == 2
    assert client.calls[-1][2] == {"budget": 2.0, "retries": 0}


# --------------------------------------------------------------------------- the lowering


def test_lowering_culls_orders_and_resolves_aliases():
    dsk = {"a": 1, "b": (inc, "a"), "alias": "b", "unused": (inc, "b"), "c": (inc, "alias")}
    lowered = di.lower(dsk, ["c", "alias"], token="t0")
    keys = [t.key for t in lowered.tasks]
    assert [di.dask_key(k) for k in keys] == ["a", "b", "c"]  # culled, no task for the alias
    assert lowered.wire["alias"] == lowered.wire["b"]
    assert lowered.tasks[2].deps == (lowered.wire["b"],)


def test_wire_keys_round_trip_and_stay_short():
    for key in ("x", ("sum-abc", 0, 12), ("a", ("b", 1), 2.5), 7):
        wire = di.wire_key(key, "tok")
        assert di.dask_key(wire) == key and len(wire) <= 256
    long = ("y" * 300, 1)
    wire = di.wire_key(long, "tok")
    assert len(wire) <= 256 and di.dask_key(wire) is None
    assert di.key_name(long).startswith(di.wire_key_name(wire))
    assert di.wire_key_name(di.wire_key(("sum-0a1b2c3d4e5f60718293a4b5c6d7e8f9", 0), "t")) == "sum"
    assert di.wire_key_name("inc-4f0c2e6a9b8d4c1e8f7a6b5c4d3e2f10") == "inc"


def test_tasks_run_where_notebook_ext_cannot_be_imported(tmp_path):
    """Providers' task processes need only dask: the runner travels by value."""
    lowered = di.lower((da.arange(12, chunks=4) * 2).sum().__dask_graph__(),
                       [(da.arange(12, chunks=4) * 2).sum().__dask_keys__()[0]])
    blob = cloudpickle.dumps([(t.key, dumps_function(t.fn)[1], dumps_args(t.args, t.kwargs),
                               t.deps) for t in lowered.tasks])
    script = (
        "import sys, pickle, cloudpickle\n"
        "sys.modules['notebook_ext'] = None\n"  # any import of it fails
        "values = {}\n"
        "for key, fn, payload, deps in pickle.loads(sys.stdin.buffer.read()):\n"
        "    args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])\n"
        "    values[key] = cloudpickle.loads(fn)({d: values[d] for d in deps}, *args, **kwargs)\n"
        "print(values[key])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], input=blob, capture_output=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "132"


# --------------------------------------------------------------------------- progress


def test_progress_counts_groups_and_draws_a_text_line(client):
    x = da.ones(12, chunks=3)
    xp = client.persist(x + 1)
    pending = [Future(client, di.wire_key(("inc-0a1b2c3d4e5f60718293a4b5c6d7e8f9", i), "t"))
               for i in range(2)]
    state = ProgressState([*futures_of(xp), *pending])
    assert {g.name: (g.done, g.total) for g in state.groups.values()} == {
        "add": (4, 4), "inc": (0, 2)}
    pending[0].set_result(1)
    pending[1].set_exception(Boom("x"))
    assert state.finished.wait(5)
    assert text_line(state).startswith("[" + "#" * 30 + "] 100%")
    assert "inc 2/2 (1 error)" in text_line(state)
    out = io.StringIO()
    progress(xp, notebook=False, file=out)
    assert "add 4/4" in out.getvalue() and out.getvalue().endswith("\n")


def test_text_progress_returns_when_the_last_future_finishes(client):
    futs = [Future(client, f"nap-{i}") for i in range(3)]
    out = io.StringIO()
    drawer = threading.Thread(target=TextProgress(ProgressState(futs), out).run, args=(10,))
    drawer.start()
    for f in futs:
        f.set_result(None)
    drawer.join(10)
    assert not drawer.is_alive() and "nap 3/3" in out.getvalue()


def test_widget_progress_builds_one_bar_per_group(client):
    from notebook_ext.progress import WidgetProgress

    futs = [Future(client, f"load-{i}") for i in range(2)] + [Future(client, "fit-0")]
    shown = WidgetProgress(ProgressState(futs)).start()
    for f in futs:
        f.set_result(None)
    shown._thread.join(10)
    assert {k: b.value for k, b in shown.bars.items()} == {"load": 2, "fit": 1}
    assert all(b.bar_style == "success" for b in shown.bars.values())
