"""Allow-list unpickling of results that come back from untrusted providers.

This module owns the client's answer to "which globals may a provider's result name?": the exact
qualified names in :data:`ALLOWED` (plus whatever the user trusts explicitly) and the unpickler that
enforces them. It must never import, look up or call a global outside that set unless the caller
passed ``trust=True``: the check runs in ``find_class``, before the module is even imported, and
fails with :class:`~notebook_ext.errors.UntrustedResultError` naming the global.

Why exact names and never prefixes: ``pandas.*`` would admit ``pandas.read_pickle`` and ``numpy.*``
would admit ``numpy.load``, each a second unrestricted unpickler. The numpy, pandas and pyarrow
entries are read from real protocol-5 pickles (``tests/test_safe_pickle.py`` pickles a zoo of
objects and fails naming any global missing here, or any entry here no object needs).

``builtins.getattr`` is not allowed, yet pickles name a classmethod as ``getattr(cls, "name")``;
``ZoneInfo._unpickle`` does, so every tz-aware Timestamp or datetime needs it. ``find_class``
therefore hands out a stand-in that resolves ``getattr(cls, name)`` only on a class and only when
``"module.Class.name"`` is itself allowed: it admits exactly what the dotted global would.

``copyreg``: protocol 2+ writes ``copyreg.__newobj__``/``__newobj_ex__`` as the NEWOBJ opcodes,
which call ``cls.__new__`` on a class ``find_class`` already admitted, so no global is named.
``copyreg._reconstructor`` appears only in protocol 0/1 pickles; it would only call ``__new__`` and
``__init__`` of classes that were themselves admitted, which REDUCE on those classes can do anyway.
It would be safe, but protocol 5 never needs it, so it stays out.

Your own classes: a class defined in a notebook or script (``__main__``) cannot be imported by
name, so cloudpickle ships it *by value*: the result's pickle rebuilds the class from its parts
(``_make_skeleton_class``, then ``_class_setstate`` with its methods as code objects). No such
constructor is ever resolved. The stand-in for ``_make_skeleton_class`` only *looks up* the
class cloudpickle tracks under the pickle's id, i.e. the very class object this client pickled
and sent with the task, and admits it only if the user trusted it by name (``trust_types``);
everything the pickle names while describing that class (its type, bases and state) is read as
inert placeholders that resolve, import and call nothing, and the state is dropped: the user's
class is never changed. A class the provider made up has an id this process never issued and
is refused, named, before anything of it is built.

What the allow-list does not buy: it stops a result from running code, not every allowed type from
accepting inconsistent state. Where the pickle goes through a function we can wrap, the result is
validated (pyarrow arrays, MultiIndex codes), since both otherwise read out of bounds. State set by
BUILD (``__setstate__``) cannot be wrapped: a crafted ``numpy.dtype`` (field offsets past its
itemsize) or ``pandas.Categorical`` (codes past its categories) still reads out of bounds.
"""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from notebook_ext.errors import UntrustedResultError

__all__ = ["ALLOWED", "loads", "qualified_name"]

_BUILTIN_VALUES = frozenset(
    f"builtins.{name}"
    for name in (
        "bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict",
        "set", "frozenset", "slice", "range", "Ellipsis", "NotImplemented",
    )
)  # fmt: skip

# Raising is what makes an exception dangerous, and unpickling only builds one.
_BUILTIN_EXCEPTIONS = frozenset(
    f"builtins.{name}"
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)

_STDLIB = frozenset({
    "collections.Counter", "collections.OrderedDict", "collections.defaultdict",
    "collections.deque",
    "datetime.date", "datetime.datetime", "datetime.time", "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
    # ZoneInfo keys are checked to be relative paths inside the tz database.
    "zoneinfo.ZoneInfo", "zoneinfo.ZoneInfo._unpickle",
})  # fmt: skip

# Read from real pickles (numpy 2.4, pandas 3.1, pyarrow 26); the zoo test keeps it exact.
_LIBRARIES = frozenset({
    "dateutil.relativedelta.relativedelta",
    "numpy._core._internal._convert_to_stringdtype_kwargs",
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    "numpy._core.numeric._frombuffer", "numpy.dtype", "numpy.ndarray",
    "numpy.ma.MaskedArray", "numpy.ma.core.MaskedConstant", "numpy.ma.core._mareconstruct",
    "numpy.rec.recarray", "numpy.record",
    "pandas.ArrowDtype", "pandas.BooleanDtype", "pandas.Categorical", "pandas.CategoricalDtype",
    "pandas.CategoricalIndex", "pandas.DataFrame", "pandas.DateOffset", "pandas.DatetimeIndex",
    "pandas.DatetimeTZDtype", "pandas.Index", "pandas.Interval", "pandas.IntervalDtype",
    "pandas.IntervalIndex", "pandas.MultiIndex", "pandas.NA", "pandas.Period",
    "pandas.PeriodDtype", "pandas.PeriodIndex", "pandas.RangeIndex", "pandas.Series",
    "pandas.SparseDtype", "pandas.StringDtype", "pandas.TimedeltaIndex",
    *(f"pandas.{kind}{bits}Dtype" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)),
    "pandas.Float32Dtype", "pandas.Float64Dtype",
    "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    "pandas._libs.internals._unpickle_block",
    "pandas._libs.interval.__pyx_unpickle_IntervalMixin",
    "pandas._libs.sparse.IntIndex",
    "pandas._libs.tslibs.nattype._nat_unpickle",
    "pandas._libs.tslibs.timedeltas._timedelta_unpickle",
    "pandas._libs.tslibs.timestamps._unpickle_timestamp",
    "pandas.arrays.ArrowExtensionArray", "pandas.arrays.ArrowStringArray",
    "pandas.arrays.BooleanArray", "pandas.arrays.DatetimeArray", "pandas.arrays.FloatingArray",
    "pandas.arrays.IntegerArray", "pandas.arrays.IntervalArray", "pandas.arrays.PeriodArray",
    "pandas.arrays.SparseArray", "pandas.arrays.StringArray", "pandas.arrays.TimedeltaArray",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.indexes.datetimes._new_DatetimeIndex",
    "pandas.core.indexes.interval._new_IntervalIndex",
    "pandas.core.indexes.timedeltas._new_TimedeltaIndex",
    "pandas.core.internals.managers.BlockManager",
    "pandas.core.internals.managers.SingleBlockManager",
    "pyarrow.lib._restore_array", "pyarrow.lib.field", "pyarrow.lib.list_",
    "pyarrow.lib.py_buffer", "pyarrow.lib.timestamp", "pyarrow.lib.type_for_alias",
    *(
        f"pandas._libs.tslibs.offsets.{name}"
        for name in (
            "BQuarterEnd", "BYearEnd", "BusinessDay", "BusinessHour", "BusinessMonthBegin",
            "BusinessMonthEnd", "CustomBusinessDay", "Day", "Easter", "FY5253", "Hour",
            "LastWeekOfMonth", "Micro", "Milli", "Minute", "MonthBegin", "MonthEnd", "Nano",
            "QuarterBegin", "QuarterEnd", "Second", "SemiMonthEnd", "Week", "WeekOfMonth",
            "YearBegin", "YearEnd",
        )
    ),
})  # fmt: skip

ALLOWED: frozenset[str] = _BUILTIN_VALUES | _BUILTIN_EXCEPTIONS | _STDLIB | _LIBRARIES
"""Exact ``module.qualname`` globals a result may name without ``trust=True``."""


def qualified_name(tp: type) -> str:
    """The ``module.qualname`` a pickle names ``tp`` by, so ``trust_types`` admits exactly it."""
    return f"{tp.__module__}.{tp.__qualname__}"


def _check_arrow_array(array: Any) -> None:
    # _restore_array trusts the pickled offsets; unchecked, reading a value can run off the buffer.
    array.validate(full=True)


def _check_index(index: Any) -> None:
    # _new_Index skips verify_integrity for MultiIndex; codes past a level would read off its end.
    from pandas import MultiIndex

    if isinstance(index, MultiIndex):
        MultiIndex(levels=index.levels, codes=index.codes, verify_integrity=True)


_CHECKS: dict[str, Callable[[Any], None]] = {
    "pyarrow.lib._restore_array": _check_arrow_array,
    "pandas.core.indexes.base._new_Index": _check_index,
}


def _checked(qualified: str, build: Callable[..., Any], check: Callable[[Any], None]) -> Callable:
    def checked_build(*args: Any, **kwargs: Any) -> Any:
        result = build(*args, **kwargs)
        try:
            check(result)
        except Exception as exc:
            message = f"{qualified} built an inconsistent object: {exc}"
            raise pickle.UnpicklingError(message) from exc
        return result

    return checked_build


_SKELETON = "cloudpickle.cloudpickle._make_skeleton_class"
_CLASS_SETSTATE = "cloudpickle.cloudpickle._class_setstate"


class _Inert:
    """What a global named inside a by-value class definition becomes (the class itself, so
    NEWOBJ accepts it): it calls, builds and changes nothing, and every operation the unpickler
    may apply to it or its instances is a no-op."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:  # NEWOBJ calls cls.__new__(cls)
        return object.__new__(_Inert)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass

    def update(self, items: Any) -> None:
        pass


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only allowed globals; everything else fails before it is imported."""

    def __init__(self, file: io.BytesIO, buffers: Sequence[Any], allowed: frozenset[str]) -> None:
        # fix_imports=False: Python 2 name mapping would resolve a different global than we checked.
        super().__init__(file, fix_imports=False, buffers=buffers)
        self._allowed = allowed
        self._definitions = 0  # by-value class definitions being read (their parts are inert)
        self._states = 0  # trusted classes whose shipped state is being read (and dropped)

    def load(self) -> Any:
        value = super().load()
        if self._definitions or self._states:
            raise pickle.UnpicklingError("the result pickle leaves a class definition unfinished")
        return value

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified == _SKELETON:
            self._definitions += 1
            return self._skeleton_class
        if qualified == _CLASS_SETSTATE:
            return self._class_setstate
        if self._definitions or self._states:
            return _Inert
        if qualified not in self._allowed:
            if qualified == "builtins.getattr":
                return self._getattr
            raise UntrustedResultError(qualified)
        found = super().find_class(module, name)
        check = _CHECKS.get(qualified)
        return found if check is None else _checked(qualified, found, check)

    def _skeleton_class(self, _type: Any, name: Any, _bases: Any, type_kwargs: Any,
                        tracker_id: Any, _extra: Any = None) -> type:
        """The trusted local class cloudpickle tracks under ``tracker_id``; never a new one."""
        from cloudpickle import cloudpickle as cp

        self._definitions = max(0, self._definitions - 1)
        module = type_kwargs.get("__module__") if isinstance(type_kwargs, dict) else None
        wanted = f"{module if isinstance(module, str) else '?'}.{name}"
        cls = cp._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker_id) if isinstance(
            tracker_id, str) else None
        if not isinstance(cls, type) or qualified_name(cls) not in self._allowed:
            raise UntrustedResultError(wanted if cls is None else qualified_name(cls),
                                       by_value=True)
        self._states += 1
        return cls

    def _class_setstate(self, cls: Any, state: Any) -> Any:
        """The shipped class body is dropped: the user's own class stays as it is."""
        self._states = max(0, self._states - 1)
        if not isinstance(cls, type):
            raise UntrustedResultError(_CLASS_SETSTATE)
        return cls

    def _getattr(self, owner: Any, attribute: Any) -> Any:
        """``getattr(cls, name)`` as pickles spell a classmethod, admitted like ``cls.name``."""
        if not isinstance(owner, type) or not isinstance(attribute, str):
            raise UntrustedResultError("builtins.getattr")
        qualified = f"{qualified_name(owner)}.{attribute}"
        if qualified not in self._allowed:
            raise UntrustedResultError(qualified)
        return getattr(owner, attribute)


def loads(
    data: bytes | memoryview,
    buffers: Sequence[bytes | memoryview] = (),
    *,
    trust: bool = False,
    extra: Iterable[str] = (),
) -> Any:
    """Decode a protocol-5 result pickle and its out-of-band ``buffers``.

    Without ``trust`` only globals in :data:`ALLOWED` or ``extra`` (exact ``module.qualname``
    names, see :func:`qualified_name`) are resolved; any other raises ``UntrustedResultError``
    before it is imported or called. Arrays view the buffers they came in: pass ``bytearray``
    buffers if the result must be writable.
    """
    if trust:
        return pickle.loads(data, buffers=buffers)
    allowed = ALLOWED | frozenset(extra)
    return _AllowListUnpickler(io.BytesIO(data), buffers, allowed).load()
