"""Tests for notebook_ext.safe_pickle: the allow-list is read from real pickles, and holds.

The zoo pickles real objects the way providers do (cloudpickle, protocol 5, out-of-band buffers)
and records every global each pickle names. A library upgrade that adds a global fails
``test_zoo_globals_are_allowed`` naming it; one that stops using an entry fails
``test_every_library_entry_is_needed``.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import datetime as dt
import functools
import io
import os
import pickle
import shlex
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notebook_ext.errors import UntrustedResultError
from notebook_ext.safe_pickle import ALLOWED, loads, qualified_name

PARIS = ZoneInfo("Europe/Paris")


def _dumps(obj: Any) -> tuple[bytes, list[bytes]]:
    """Pickle as a provider does; buffers leave as bytes, as they would off the wire."""
    buffers: list[pickle.PickleBuffer] = []
    with _stock_reducers():
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return data, [bytes(b.raw()) for b in buffers]


@contextlib.contextmanager
def _stock_reducers() -> Any:
    """Importing ``distributed`` (other tests in this process do) registers tblib's exception
    reducers process-wide in copyreg; a provider's task process pickles with the stock ones."""
    saved = dict(copyreg.dispatch_table)
    for cls, reducer in saved.items():
        if getattr(reducer, "__module__", "").startswith("tblib"):
            del copyreg.dispatch_table[cls]
    try:
        yield
    finally:
        copyreg.dispatch_table.clear()
        copyreg.dispatch_table.update(saved)


class _Recorder(pickle.Unpickler):
    """Plain unpickler that notes each global, spelling getattr(cls, name) as ``cls.name``."""

    def __init__(self, data: bytes, buffers: list[bytes]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return self._getattr
        self.names.add(f"{module}.{name}")
        return super().find_class(module, name)

    def _getattr(self, owner: Any, attribute: str) -> Any:
        self.names.add(f"{qualified_name(owner)}.{attribute}")
        return getattr(owner, attribute)


def _globals_of(obj: Any) -> set[str]:
    recorder = _Recorder(*_dumps(obj))
    recorder.load()
    return recorder.names


# --- the zoo -------------------------------------------------------------------------------------

_OFFSETS = {
    name: getattr(pd.offsets, name)(2)
    for name in (
        "Day", "Hour", "Minute", "Second", "Milli", "Micro", "Nano", "BusinessDay",
        "BusinessHour", "CustomBusinessDay", "MonthEnd", "MonthBegin", "BusinessMonthEnd",
        "BusinessMonthBegin", "SemiMonthEnd", "QuarterEnd", "QuarterBegin", "BQuarterEnd",
        "YearEnd", "YearBegin", "BYearEnd", "Week", "Easter",
    )
}  # fmt: skip
_OFFSETS |= {
    "WeekOfMonth": pd.offsets.WeekOfMonth(week=1, weekday=2),
    "LastWeekOfMonth": pd.offsets.LastWeekOfMonth(weekday=4),
    "FY5253": pd.offsets.FY5253(weekday=1, startingMonth=3, variation="nearest"),
    "DateOffset": pd.DateOffset(months=1, days=2),
}

_NUMPY_ARRAYS = {
    dtype: np.arange(6).astype(dtype)
    for dtype in ("?", "i1", "i2", "i4", "i8", "u1", "u8", "f2", "f4", "f8", "g", "c8", "c16",
                  "U5", "S3", "M8[ns]", "M8[D]", "m8[s]")
}  # fmt: skip
_STRUCT = np.dtype([("a", "i4"), ("b", "f8", (2,)), ("c", [("d", "U3")])])

_NUMPY = {
    **{f"ndarray_{dtype}": array for dtype, array in _NUMPY_ARRAYS.items()},
    "ndarray_nan_inf": np.array([np.nan, np.inf, -0.0]),
    "ndarray_object": np.array([1, "a", None, Decimal("1.5")], dtype=object),
    "ndarray_struct": np.zeros(3, dtype=_STRUCT),
    "ndarray_stringdtype": np.array(["a", "bb"], dtype=np.dtypes.StringDType()),
    "ndarray_empty": np.empty((0, 3)),
    "ndarray_0d": np.array(3.5),
    "ndarray_fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "ndarray_strided": np.arange(20).reshape(4, 5)[::2, ::-1],
    "ndarray_big": np.arange(100_000),
    "masked": np.ma.masked_array([1, 2, 3], mask=[False, True, False]),
    "masked_nomask": np.ma.masked_array([1.0, 2.0]),
    "masked_struct": np.ma.masked_array(np.zeros(2, dtype=[("a", "i4")]), mask=[(True,), (False,)]),
    "masked_constant": np.ma.masked,
    "recarray": np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "dtype": np.dtype("f8"),
    "dtype_struct": np.dtype([("a", "i4"), ("b", "f8")], align=True),
    "dtype_datetime": np.dtype("M8[ns]"),
    **{f"scalar_{type(v).__name__}": v for v in (
        np.float64(1.5), np.float16(2.5), np.longdouble(3.5), np.int32(-3), np.uint8(7),
        np.bool_(True), np.complex128(1 + 2j), np.datetime64("2020-01-02"),
        np.timedelta64(5, "s"), np.str_("abc"), np.bytes_(b"ab"),
    )},
    "scalar_void": np.zeros(1, dtype=[("a", "i4"), ("b", "f8")])[0],
}  # fmt: skip

_NULLABLE = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float32", "Float64")  # fmt: skip

_SERIES = {
    "int": pd.Series([1, 2, 3], name="n"),
    "float": pd.Series([1.5, np.nan]),
    "bool": pd.Series([True, False]),
    "str": pd.Series(["a", None, "c"]),
    "object": pd.Series([1, "a", None], dtype=object),
    "category": pd.Series(pd.Categorical(["b", "a", "b"], ordered=True)),
    "datetime": pd.Series(pd.date_range("2020-01-01", periods=3)),
    "datetime_utc": pd.Series(pd.date_range("2020-01-01", periods=3, tz="UTC")),
    "datetime_paris": pd.Series(pd.date_range("2020-01-01", periods=3, tz="Europe/Paris")),
    "timedelta": pd.Series(pd.to_timedelta([1, 2], unit="s")),
    "period": pd.Series(pd.period_range("2020-01", periods=2, freq="M")),
    "interval": pd.Series(pd.interval_range(0, 3)),
    **{dtype: pd.Series([1, None], dtype=dtype) for dtype in _NULLABLE},
    "boolean": pd.Series([True, None], dtype="boolean"),
    "string_python": pd.Series(["a", None], dtype="string[python]"),
    "sparse": pd.Series(pd.arrays.SparseArray([0, 0, 1, 0])),
    "arrow_int": pd.Series([1, 2], dtype="int64[pyarrow]"),
    "arrow_timestamp": pd.Series(
        pd.array([pd.Timestamp("2020-01-01")], dtype=pd.ArrowDtype(pa.timestamp("us", "UTC")))
    ),
    "arrow_list": pd.Series(pd.array([[1, 2], []], dtype=pd.ArrowDtype(pa.list_(pa.int64())))),
}

_INDEXES = {
    "range": pd.RangeIndex(2, 20, 3),
    "int": pd.Index([3, 1, 2]),
    "str": pd.Index(["a", "b"]),
    "object": pd.Index([1, "a"], dtype=object),
    "bool": pd.Index([True, False]),
    "datetime": pd.date_range("2020-01-01", periods=3, freq="D"),
    "datetime_paris": pd.date_range("2020-01-01", periods=3, freq="h", tz="Europe/Paris"),
    "datetime_nofreq": pd.DatetimeIndex(["2020-01-01", "2020-01-05"]),
    "timedelta": pd.timedelta_range("1D", periods=3),
    "period": pd.period_range("2020", periods=3, freq="Q"),
    "category": pd.CategoricalIndex(["a", "b", "a"]),
    "interval": pd.interval_range(0, 3),
    "multi": pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["n", "s"]),
}

_FRAME = pd.DataFrame({f"col_{name}": s for name, s in _SERIES.items() if len(s) == 2})
_FRAME_ATTRS = pd.DataFrame({"a": [1]})
_FRAME_ATTRS.attrs["units"] = "m"

_PANDAS = {
    **{f"series_{name}": series for name, series in _SERIES.items()},
    **{f"index_{name}": index for name, index in _INDEXES.items()},
    "frame_mixed": _FRAME,
    "frame_multi_columns": pd.DataFrame(
        [[1, 2.5]], columns=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)])
    ),
    "frame_datetime_index": pd.DataFrame({"x": [1.0, 2.0]}, index=_INDEXES["datetime"][:2]),
    "frame_empty": pd.DataFrame(),
    "frame_attrs": _FRAME_ATTRS,
    "categorical": pd.Categorical([1.5, 2.5, 1.5]),
    "integer_array": pd.array([1, None], dtype="Int64"),
    "timestamp": pd.Timestamp("2020-01-01 12:00"),
    "timestamp_utc": pd.Timestamp("2020-01-01", tz="UTC"),
    "timestamp_paris": pd.Timestamp("2020-01-01", tz="Europe/Paris"),
    "timestamp_fixed": pd.Timestamp("2020-01-01T00:00+02:00"),
    "timedelta": pd.Timedelta("1 days 2 s"),
    "period": pd.Period("2020-01", freq="M"),
    "interval": pd.Interval(0, 1, closed="left"),
    "nat": pd.NaT,
    "na": pd.NA,
    **{f"offset_{name}": offset for name, offset in _OFFSETS.items()},
}

_STDLIB = {
    "containers": {"a": [1, 2.5, "s", b"b", None, True], "t": (1, (2, 3)), "s": {1, 2}},
    "frozenset": frozenset({"x", 1}),
    "bytearray": bytearray(b"xyz"),
    "bigint": 2**100,
    "complex": 1 + 2j,
    "slice": slice(1, 10, 2),
    "range": range(2, 10, 3),
    "ellipsis": ...,
    "notimplemented": NotImplemented,
    "date": dt.date(2020, 1, 2),
    "time": dt.time(1, 2, 3, tzinfo=dt.UTC),
    "datetime": dt.datetime(2020, 1, 2, 3, 4, 5, 6),
    "datetime_fixed": dt.datetime(2020, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-5), "EST")),
    "datetime_zoneinfo": dt.datetime(2020, 1, 2, tzinfo=PARIS),
    "timedelta": dt.timedelta(days=1, microseconds=5),
    "decimal": Decimal("3.14159"),
    "fraction": Fraction(22, 7),
    "uuid": uuid.UUID(int=0x1234_5678_9ABC),
    "ordereddict": collections.OrderedDict(b=1, a=2),
    "defaultdict": collections.defaultdict(list, a=[1]),
    "deque": collections.deque([1, 2], maxlen=5),
    "counter": collections.Counter("abracadabra"),
    "valueerror": ValueError("bad", 3),
    "keyerror": KeyError("k"),
    "oserror": FileNotFoundError(2, "No such file", "x.txt"),
    "exceptiongroup": ExceptionGroup("many", [ValueError("a"), TypeError("b")]),
    "stopiteration": StopIteration(5),
    "warning": UserWarning("careful"),
}

ZOO: dict[str, Any] = {**_STDLIB, **_NUMPY, **_PANDAS}


def _assert_same(got: Any, want: Any) -> None:
    """Equality that understands arrays, frames, NaN and exceptions."""
    assert type(got) is type(want)
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
        assert got.attrs == want.attrs
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, pd.Index):
        pd.testing.assert_index_equal(got, want, exact=True)
        assert getattr(got, "freq", None) == getattr(want, "freq", None)
    elif isinstance(want, pd.api.extensions.ExtensionArray):
        pd.testing.assert_extension_array_equal(got, want)
    elif want is np.ma.masked or want is pd.NaT or want is pd.NA:
        assert got is want
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.ma.getmaskarray(got), np.ma.getmaskarray(want))
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, BaseException):
        _assert_same(got.args, want.args)
        _assert_same(getattr(got, "exceptions", ()), getattr(want, "exceptions", ()))
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for got_item, want_item in zip(got, want, strict=True):
            _assert_same(got_item, want_item)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    else:
        assert got == want
    if isinstance(want, dt.datetime | dt.time | pd.Timestamp):
        assert got.tzinfo == want.tzinfo


@pytest.mark.parametrize("name", ZOO)
def test_zoo_globals_are_allowed(name: str) -> None:
    missing = _globals_of(ZOO[name]) - ALLOWED
    assert not missing, f"pickling {name} names globals outside ALLOWED: {sorted(missing)}"


@pytest.mark.parametrize("name", ZOO)
def test_zoo_round_trips(name: str) -> None:
    _assert_same(loads(*_dumps(ZOO[name])), ZOO[name])


def test_every_library_entry_is_needed() -> None:
    """Everything but builtins is justified by a real pickle, so the list stays minimal."""
    used = set().union(*(_globals_of(obj) for obj in ZOO.values()))
    unused = {name for name in ALLOWED if not name.startswith("builtins.")} - used
    assert not unused, f"ALLOWED entries no zoo object needs: {sorted(unused)}"


_BUILTIN_VALUES = (
    "bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict", "set",
    "frozenset", "slice", "range", "Ellipsis", "NotImplemented",
)  # fmt: skip


def test_builtins_entries_are_values_or_exceptions() -> None:
    exceptions = {
        f"builtins.{name}"
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    values = {f"builtins.{name}" for name in _BUILTIN_VALUES}
    assert {name for name in ALLOWED if name.startswith("builtins.")} == exceptions | values


@pytest.mark.parametrize(
    "name",
    [
        "builtins.getattr", "builtins.setattr", "builtins.eval", "builtins.exec",
        "builtins.compile", "builtins.__import__", "builtins.open", "builtins.type",
        "builtins.object", "builtins.globals", "builtins.vars", "builtins.breakpoint",
        "os.system", "posix.system", "subprocess.Popen", "sys.modules",
        "importlib.import_module", "functools.partial", "pickle.loads", "copyreg._reconstructor",
        "numpy.load", "numpy.fromfile", "pandas.read_pickle", "pandas.eval", "pyarrow.lib.ipc",
    ],
)  # fmt: skip
def test_dangerous_names_are_absent(name: str) -> None:
    assert name not in ALLOWED


def test_allowed_has_only_exact_names() -> None:
    assert all("*" not in name and name.count(".") >= 1 for name in ALLOWED)
    assert "pandas" not in ALLOWED and "numpy" not in ALLOWED


def test_out_of_band_buffers_are_used_and_accepted_as_memoryviews() -> None:
    data, buffers = _dumps(np.arange(1000))
    assert buffers, "numpy arrays should travel out of band"
    got = loads(memoryview(data), [memoryview(bytearray(b)) for b in buffers])
    np.testing.assert_array_equal(got, np.arange(1000))
    assert got.flags.writeable, "bytearray buffers give a writable result"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
        | st.binary() | st.complex_numbers(allow_nan=False),
        lambda inner: st.lists(inner) | st.tuples(inner, inner)
        | st.dictionaries(st.text(), inner) | st.frozensets(st.integers()),
        max_leaves=20,
    )
)  # fmt: skip
def test_plain_values_round_trip(value: Any) -> None:
    assert loads(*_dumps(value)) == value


# --- adversarial results -------------------------------------------------------------------------


class _Reduce:
    """Unpickles as ``fn(*args)``: how a hostile provider makes the client call something."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args

    def __call__(self, *args: Any) -> Any:
        # Pickle insists a reduce callable be callable; this one is, as what it unpickles to.
        return self.fn(*self.args)(*args)


class Sneaky:
    """A class of the user's own whose ``__setstate__`` has side effects."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["path"]).touch()
        self.__dict__.update(state)


class MyPoint:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MyPoint) and (self.x, self.y) == (other.x, other.y)


class Pair(NamedTuple):
    left: int
    right: int


def _touch_command(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _evil_pickle_file(tmp_path: Path, marker: Path) -> str:
    """A file whose plain unpickling creates ``marker``: what numpy.load/read_pickle would read."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Reduce(os.system, _touch_command(marker))))
    return str(path)


# Each builds (payload, global the error must name) for a marker file the payload would create.
_PAYLOADS: dict[str, Callable[[Path, Path], tuple[Any, str]]] = {
    "os.system": lambda tmp, m: (
        _Reduce(os.system, _touch_command(m)),
        f"{os.system.__module__}.system",
    ),
    "builtins.eval": lambda tmp, m: (
        _Reduce(eval, f"open({str(m)!r}, 'w').close()"),
        "builtins.eval",
    ),
    "builtins.exec": lambda tmp, m: (
        _Reduce(exec, f"open({str(m)!r}, 'w').close()"),
        "builtins.exec",
    ),
    "subprocess.Popen": lambda tmp, m: (
        _Reduce(subprocess.Popen, ["touch", str(m)]),
        "subprocess.Popen",
    ),
    "functools.partial": lambda tmp, m: (
        _Reduce(functools.partial(os.system, _touch_command(m))),
        "functools.partial",
    ),
    # getattr(cls, name) is admitted only as far as "module.cls.name" is: tofile writes files.
    "builtins.getattr": lambda tmp, m: (
        _Reduce(_Reduce(getattr, np.ndarray, "tofile"), np.arange(3), str(m)),
        "numpy.ndarray.tofile",
    ),
    "numpy.load": lambda tmp, m: (
        _Reduce(np.load, _evil_pickle_file(tmp, m), None, True),
        "numpy.load",
    ),
    "pandas.read_pickle": lambda tmp, m: (
        _Reduce(pd.read_pickle, _evil_pickle_file(tmp, m)),
        "pandas.read_pickle",
    ),
    "user class": lambda tmp, m: (Sneaky(str(m)), qualified_name(Sneaky)),
    "nested in containers": lambda tmp, m: (
        [1, {"k": (np.arange(3), _Reduce(os.system, _touch_command(m)))}],
        f"{os.system.__module__}.system",
    ),
    "nested in a DataFrame": lambda tmp, m: (
        pd.DataFrame({"a": [1.0, 2.0], "b": [1, _Reduce(eval, f"open({str(m)!r}, 'w')")]}),
        "builtins.eval",
    ),
}


@pytest.mark.parametrize("kind", _PAYLOADS)
def test_untrusted_global_is_refused_and_nothing_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload, expected = _PAYLOADS[kind](tmp_path, marker)
    with pytest.raises(UntrustedResultError) as info:
        loads(*_dumps(payload))
    assert info.value.name == expected
    assert expected in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", _PAYLOADS)
def test_trust_runs_the_same_payloads(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload, _ = _PAYLOADS[kind](tmp_path, marker)
    result = loads(*_dumps(payload), trust=True)
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


def test_refused_module_is_never_imported() -> None:
    # Importing "this" prints the Zen of Python: a visible side effect of a lookup.
    assert "this" not in sys.modules
    with pytest.raises(UntrustedResultError, match="this.s"):
        loads(b"cthis\ns\n.")
    assert "this" not in sys.modules


def test_functions_pickled_by_value_are_refused() -> None:
    with pytest.raises(UntrustedResultError) as info:
        loads(*_dumps(lambda: 1))
    assert info.value.name not in ALLOWED


def test_getattr_on_an_instance_is_refused() -> None:
    with pytest.raises(UntrustedResultError, match="builtins.getattr"):
        loads(*_dumps(_Reduce(_Reduce(getattr, "{}", "format"), 1)))


@pytest.mark.parametrize("value", [MyPoint(1.0, 2.5), Pair(1, 2)], ids=["class", "namedtuple"])
def test_user_types_need_explicit_trust(value: Any) -> None:
    name = qualified_name(type(value))
    assert name == f"{__name__}.{type(value).__qualname__}"
    with pytest.raises(UntrustedResultError) as info:
        loads(*_dumps(value))
    assert info.value.name == name
    assert loads(*_dumps(value), extra=[name]) == value


@pytest.mark.parametrize("almost", ["{module}", "{module}.*", "{module}.MyPoin", "MyPoint"])
def test_extra_is_exact_not_a_prefix(almost: str) -> None:
    with pytest.raises(UntrustedResultError):
        loads(*_dumps(MyPoint(0, 0)), extra=[almost.format(module=__name__)])


def test_qualified_name_matches_what_pickles_name() -> None:
    assert qualified_name(int) == "builtins.int"
    assert qualified_name(pd.DataFrame) == "pandas.DataFrame"
    assert qualified_name(collections.OrderedDict) == "collections.OrderedDict"


# --- allowed globals fed inconsistent state ------------------------------------------------------


def test_arrow_array_with_offsets_past_its_data_is_refused() -> None:
    restore, (state,) = pa.array(["a", "b"]).__reduce__()
    offsets = pa.py_buffer(struct.pack("<iii", 0, 1, 10**8))
    state = (*state[:4], [None, offsets, state[4][2]], *state[5:])
    with pytest.raises(pickle.UnpicklingError, match="pyarrow.lib._restore_array"):
        loads(*_dumps(_Reduce(restore, state)))


def test_multiindex_with_codes_past_its_levels_is_refused() -> None:
    bad = pd.MultiIndex(levels=[[1, 2]], codes=[[0, 120]], verify_integrity=False)
    with pytest.raises(pickle.UnpicklingError, match="_new_Index"):
        loads(*_dumps(bad))
