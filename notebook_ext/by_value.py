"""Which modules a task's code comes from, and which of them travel by value.

cloudpickle pickles a function or class *by reference* (its module and name) unless it lives in
``__main__``; the provider then imports that module, so a function from ``mylib.py`` beside the
notebook dies there with ``ModuleNotFoundError``. This module walks what a function references
(globals its code reads, closure cells, defaults, classes' bases and methods, recursively through
the user's own code) and registers every *user* module it meets with
``cloudpickle.register_pickle_by_value`` before the function is pickled.

A module is the user's (travels by value) when it is neither in the standard library nor provided
by an installed distribution, or when it comes from an *editable* install (``pip install -e``:
code under development). decompute's own packages never travel by value: every provider has them.
The installed modules met on the way are returned too: :mod:`notebook_ext.requirements` turns
them into the task's inferred requirements. Nothing here imports a module or runs user code: it
reads attributes of objects the notebook already holds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import sys
import sysconfig
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

#: Objects visited per walk, at most: bounds the work on a function reaching a huge module graph.
MAX_VISITS = 5_000
#: Containers (tuples, lists, dicts, sets) looked into per level, and how deep.
MAX_CONTAINER = 64
MAX_DEPTH = 8
#: Top-level packages that are decompute itself or what every provider's task process imports.
ALWAYS_PRESENT = frozenset({"notebook_ext", "gateway", "provider", "cloudpickle", "msgpack"})

_EMPTY = object()
_lock = threading.Lock()
_forced: set[str] = set()


@dataclass
class Walk:
    """What one function (or set of arguments) references."""

    by_value: set[str] = field(default_factory=set)  # user modules, registered by value
    installed: set[str] = field(default_factory=set)  # top-level names of installed modules


def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths}
    dirs |= {os.path.realpath(os.path.join(sys.base_prefix, "lib",
                                           f"python{sys.version_info[0]}.{sys.version_info[1]}"))}
    return tuple(sorted(dirs))


@functools.cache
def _site_dirs() -> tuple[str, ...]:
    import site

    dirs = set(getattr(site, "getsitepackages", list)())
    user = getattr(site, "getusersitepackages", lambda: None)()
    paths = sysconfig.get_paths()
    dirs |= {user} if user else set()
    dirs |= {paths[k] for k in ("purelib", "platlib") if k in paths}
    return tuple(sorted(os.path.realpath(d) for d in dirs))


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level import name -> distributions providing it (read once per process)."""
    return importlib.metadata.packages_distributions()


@functools.cache
def _dist_root(dist: str) -> str | None:
    """The folder a (non-editable) distribution was installed into; None for an editable
    install (its code is a working copy: the user's) or an unreadable one."""
    try:
        d = importlib.metadata.distribution(dist)
        text = d.read_text("direct_url.json")
        if text and json.loads(text).get("dir_info", {}).get("editable"):
            return None
        return os.path.realpath(str(d.locate_file("")))
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError, OSError):
        return None


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


@functools.lru_cache(maxsize=4096)
def _kind(top: str, file: str | None) -> str:
    """``"user"``, ``"installed"`` or ``"stdlib"`` for a top-level module name and its file.

    Where the file is decides, not the name: a ``utils.py`` beside the notebook is the user's
    even if some installed distribution also has a top-level ``utils``."""
    if top in ALWAYS_PRESENT:
        return "installed"
    if top in sys.stdlib_module_names or top == "builtins":
        return "stdlib"
    if file is None:  # __main__ in a kernel, or a built-in module
        return "user" if top == "__main__" else (
            "installed" if _distributions().get(top) else "stdlib")
    real = os.path.realpath(file)
    roots = [r for d in _distributions().get(top, []) if (r := _dist_root(d)) is not None]
    if _under(real, roots) or _under(real, _site_dirs()) \
            or f"{os.sep}site-packages{os.sep}" in real or f"{os.sep}dist-packages{os.sep}" in real:
        return "installed"
    if _under(real, _stdlib_dirs()):
        return "stdlib"
    return "user"  # beside the notebook, a local package, an editable install


def _top(module_name: str) -> str:
    return module_name.partition(".")[0]


def module_kind(module: types.ModuleType | str) -> str:
    """How a module's objects travel: ``"user"`` (by value), ``"installed"`` (by reference, a
    requirement) or ``"stdlib"`` (by reference, always present)."""
    name = module if isinstance(module, str) else module.__name__
    top = _top(name)
    return _kind(top, _file_of(sys.modules.get(top)))


def _file_of(module: types.ModuleType | None) -> str | None:
    """A module's file, or a namespace package's first folder (a local package directory
    without ``__init__.py`` has no ``__file__``)."""
    file = getattr(module, "__file__", None)
    if isinstance(file, str):
        return file
    path = getattr(module, "__path__", None)
    try:
        first = next(iter(path)) if path is not None else None
    except (StopIteration, TypeError):
        return None
    return first if isinstance(first, str) else None


def travels_by_value(module: types.ModuleType | str) -> bool:
    """Whether functions and classes of ``module`` are pickled by value (their code travels
    with the task) rather than by reference (the provider must import the module itself)."""
    name = module if isinstance(module, str) else module.__name__
    if name == "__main__" or _top(name) in _forced:
        return True
    mod = sys.modules.get(name)
    try:
        if mod is not None and cloudpickle.cloudpickle._is_registered_pickle_by_value(mod):
            return True
    except AttributeError:  # a cloudpickle without the private helper
        pass
    return module_kind(name) == "user"


def ship_module(module: types.ModuleType) -> None:
    """Force ``module`` (and its submodules) to travel by value, for a case the heuristic
    misses (a module of yours that an installed distribution also provides)."""
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"ship_module takes a module object, not {type(module).__name__}; "
                        f"import it first (import mylib; client.ship_module(mylib))")
    with _lock:
        _forced.add(_top(module.__name__))
        _register(module.__name__)


def _register(name: str) -> None:
    """Register a module's top-level package by value (submodules follow their package)."""
    top = _top(name)
    mod = sys.modules.get(top) or sys.modules.get(name)
    if mod is None or top == "__main__" or top in ALWAYS_PRESENT:
        return  # __main__ goes by value anyway; decompute's own modules that travel by value
        # (the Dask runner) registered themselves, and the rest of the package must not
    try:
        if not cloudpickle.cloudpickle._is_registered_pickle_by_value(mod):
            cloudpickle.register_pickle_by_value(mod)
    except (ValueError, AttributeError):  # not in sys.modules under its name: pickled as is
        pass


class _Walker:
    def __init__(self) -> None:
        self.walk = Walk()
        self.seen: set[int] = set()
        self.visits = 0

    def module(self, name: str | None) -> bool:
        """Note a module an object comes from; True when it travels by value (look inside)."""
        if not name or not isinstance(name, str):
            return False
        if travels_by_value(name):
            if name != "__main__":
                self.walk.by_value.add(_top(name))
            return True
        if module_kind(name) == "installed":
            self.walk.installed.add(_top(name))
        return False

    def visit(self, obj: Any, depth: int) -> None:
        if depth > MAX_DEPTH or self.visits >= MAX_VISITS or id(obj) in self.seen:
            return
        self.visits += 1
        self.seen.add(id(obj))
        if isinstance(obj, types.ModuleType):
            if self.module(obj.__name__) and obj.__name__ != "__main__":
                # Pickled whole (its namespace): what it holds travels or is needed too.
                for value in list(vars(obj).values())[:MAX_VISITS]:
                    if isinstance(value, (types.ModuleType, types.FunctionType, type)):
                        self.visit(value, depth + 1)
            return
        if isinstance(obj, (types.FunctionType, types.MethodType)):
            func = obj.__func__ if isinstance(obj, types.MethodType) else obj
            if isinstance(obj, types.MethodType):
                self.visit(obj.__self__, depth + 1)
            # No module (exec'd code): cloudpickle cannot find it by name, so it goes by value.
            if func.__module__ is None or self.module(func.__module__):
                self.function(func, depth)
            return
        if isinstance(obj, type):
            if self.module(obj.__module__):
                self.klass(obj, depth)
            return
        if isinstance(obj, (staticmethod, classmethod)):
            self.visit(obj.__func__, depth + 1)
            return
        if isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    self.visit(f, depth + 1)
            return
        if isinstance(obj, functools.partial):
            self.visit(obj.func, depth + 1)
            self.container(obj.args, depth)
            self.container(list((obj.keywords or {}).values()), depth)
            return
        if isinstance(obj, (tuple, list, set, frozenset)):
            self.container(obj, depth)
            return
        if isinstance(obj, dict):
            self.container(list(obj.values())[:MAX_CONTAINER], depth)
            return
        if isinstance(obj, (str, bytes, int, float, complex, bool, type(None))):
            return
        self.visit(type(obj), depth + 1)  # an instance: its class travels with it

    def container(self, items: Iterable[Any], depth: int) -> None:
        for i, item in enumerate(items):
            if i >= MAX_CONTAINER:
                break
            self.visit(item, depth + 1)

    def function(self, fn: types.FunctionType, depth: int) -> None:
        """A function pickled by value: what its code reads travels (or is needed) too."""
        g = fn.__globals__
        for name in code_names(fn.__code__):
            if name in g:
                self.visit(g[name], depth + 1)
        for cell in fn.__closure__ or ():
            value = _cell_value(cell)
            if value is not _EMPTY:
                self.visit(value, depth + 1)
        self.container(fn.__defaults__ or (), depth)
        self.container(list((fn.__kwdefaults__ or {}).values()), depth)

    def klass(self, cls: type, depth: int) -> None:
        """A class pickled by value: its bases, metaclass and members."""
        for base in cls.__bases__:
            self.visit(base, depth + 1)
        self.visit(type(cls), depth + 1)
        for value in list(vars(cls).values())[:MAX_VISITS]:
            if isinstance(value, (types.FunctionType, staticmethod, classmethod, property, type)):
                self.visit(value, depth + 1)


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later, or never)
        return _EMPTY


@functools.lru_cache(maxsize=1024)
def code_names(code: types.CodeType) -> tuple[str, ...]:
    """Global names ``code`` and the code nested in it may read (as cloudpickle collects them)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(code_names(const))
    return tuple(sorted(names))


def analyze(*objs: Any) -> Walk:
    """Walk ``objs`` (a function, or arguments): the user modules met and the installed ones."""
    walker = _Walker()
    for obj in objs:
        walker.visit(obj, 0)
    return walker.walk


def prepare(*objs: Any) -> Walk:
    """Register every user module ``objs`` reference by value (call before pickling them) and
    say which installed top-level modules they need. Idempotent; cheap on a second call."""
    walk = analyze(*objs)
    with _lock:
        for name in walk.by_value:
            _register(name)
    return walk
