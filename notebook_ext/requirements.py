"""The packages a task needs: what the user declares and what its code shows.

``packages=["scikit-learn>=1.5"]`` (and ``%%decompute --packages``) are PEP 508 strings, checked
here so that a typo fails at ``submit`` with the string and the reason, not on a provider. To them
the client adds what the function's code references (:mod:`notebook_ext.by_value` walks it): the
distribution of each installed top-level module, and for libraries whose pickles only load under
the same major version (numpy, pandas, scikit-learn, ...) at least the client's major:
``numpy>=2,<3``. A declared requirement on the same distribution wins over an inferred one.

Also here: the one-time warning when a result comes from a provider whose numpy or pandas has
another major version than the client's (arrays and frames may then decode wrongly).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from packaging.requirements import InvalidRequirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from gateway.protocol import MAX_REQUIREMENT_LEN, MAX_REQUIREMENTS, parse_requirement
from notebook_ext import by_value

log = logging.getLogger(__name__)

#: Distributions whose pickles load only under the same major version (their reducers name
#: private constructors that move between majors).
VERSION_SENSITIVE = frozenset({
    "numpy", "pandas", "scikit-learn", "scipy", "torch", "tensorflow", "jax", "jaxlib",
    "xgboost", "lightgbm", "pyarrow", "polars", "statsmodels",
})
#: Distributions whose major version is compared between client and provider on results.
RESULT_SENSITIVE = ("numpy", "pandas")
#: Distributions never inferred: every provider's task process has them (decompute itself).
NEVER_INFERRED = frozenset({"decompute", "cloudpickle", "msgpack", "packaging"})


class PackageWarning(UserWarning):
    """A client/provider package difference that may change results (shown once per pair)."""


def validate(packages: Iterable[str] | str | None) -> list[str]:
    """Declared requirements, each a valid PEP 508 string; ValueError names the bad one.

    A single string is refused (``packages="numpy"`` would be read as five one-letter names)."""
    if packages is None:
        return []
    if isinstance(packages, str):
        raise ValueError(f"packages must be a list of requirement strings, e.g. "
                         f"packages=[{packages!r}], not a string")
    out = []
    for item in packages:
        if not isinstance(item, str):
            raise ValueError(f"packages: {item!r} is not a string; give PEP 508 requirement "
                             f"strings such as 'scikit-learn>=1.5'")
        text = item.strip()
        if len(text) > MAX_REQUIREMENT_LEN:
            raise ValueError(f"packages: {text[:40]!r}... is longer than "
                             f"{MAX_REQUIREMENT_LEN} characters")
        try:
            parse_requirement(text)
        except InvalidRequirement as exc:
            raise ValueError(f"packages: {text!r} is not a valid requirement ({exc}); write "
                             f"e.g. 'scikit-learn>=1.5' or 'numpy>=1.26,<3'") from None
        out.append(text)
    if len(out) > MAX_REQUIREMENTS:
        raise ValueError(f"packages: {len(out)} requirements; a task may declare at most "
                         f"{MAX_REQUIREMENTS}")
    return out


def split_flag(text: str) -> list[str]:
    """``%%decompute --packages`` text as requirement strings. Commas separate requirements,
    except inside one's version range: ``numpy>=1.26,<3,pandas`` is two requirements."""
    out: list[str] = []
    # IPython's magic parser keeps quotes ('numpy>=1,<3' guards < and > from the shell habit).
    for piece in (p.strip().strip("'\"").strip() for p in text.split(",")):
        if not piece:
            continue
        if out and piece[0] in "<>=!~":  # another clause of the previous requirement's range
            out[-1] = f"{out[-1]},{piece}"
        else:
            out.append(piece)
    return validate(out)


@functools.cache
def _dists_of(top: str) -> tuple[str, ...]:
    return tuple(importlib.metadata.packages_distributions().get(top, ()))


@functools.cache
def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def inferred(top_level_modules: Iterable[str]) -> list[str]:
    """Requirements for installed top-level modules: each one's distribution, with the client's
    major version for the version-sensitive ones (``numpy>=2,<3``). Sorted, deduplicated."""
    out: dict[str, str] = {}
    for top in top_level_modules:
        for dist in _dists_of(top):
            name = canonicalize_name(dist)
            if name in NEVER_INFERRED or name in out:
                continue
            out[name] = _requirement(name, _installed_version(dist))
    return [out[k] for k in sorted(out)]


def _requirement(name: str, version: str | None) -> str:
    if name not in VERSION_SENSITIVE or version is None:
        return name
    try:
        major = Version(version).major
    except InvalidVersion:
        return name
    return f"{name}>={major},<{major + 1}"


def merge(declared: Iterable[str], inferred_reqs: Iterable[str]) -> list[str]:
    """Declared requirements, then the inferred ones on distributions not declared."""
    declared = list(declared)
    names = {canonicalize_name(parse_requirement(r).name) for r in declared}
    extra = [r for r in inferred_reqs if canonicalize_name(parse_requirement(r).name) not in names]
    return (declared + extra)[:MAX_REQUIREMENTS]


def for_task(fn: Any, declared: Iterable[str] | str | None = None, args: tuple = (),
             kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """A task's ``TaskSpec.packages``: declared (validated) plus inferred from ``fn`` and its
    arguments. Registers the user modules they reference by value as a side effect (so call it
    before pickling, or let ``serialize`` do that)."""
    walk = by_value.prepare(fn, *args, *(kwargs or {}).values())
    return merge(validate(declared), inferred(walk.installed))


def imported_by(source: str) -> set[str]:
    """Top-level module names a cell's source imports (``import x.y``, ``from x import y``);
    relative imports and unparseable source give nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return names


def for_cell(source: str, values: Iterable[Any], declared: Iterable[str] | str | None = None
             ) -> list[str]:
    """A ``%%decompute`` cell's packages: declared, plus inferred from what its source imports
    and from the values it is sent (registering the user's modules among them by value)."""
    walk = by_value.prepare(*values)
    tops = walk.installed | {name for name in imported_by(source)
                             if by_value.module_kind(name) == "installed"}
    return merge(validate(declared), inferred(tops))


def format_packages(packages: Mapping[str, str] | None, installs: bool = False,
                    limit: int = 4) -> str:
    """A provider's notable packages for a table cell: ``numpy 2.1.0, pandas 2.2.3 +3``, and
    ``installs`` when it builds environments for what it lacks."""
    items = [f"{name} {version}" for name, version in (packages or {}).items()]
    text = ", ".join(items[:limit]) + (f" +{len(items) - limit}" if len(items) > limit else "")
    if installs:
        text = f"{text} · installs" if text else "installs"
    return text or "-"


# --------------------------------------------------------------------------- version warnings

_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def major_mismatches(local: Mapping[str, str], remote: Mapping[str, str],
                     names: Iterable[str] = RESULT_SENSITIVE) -> list[tuple[str, str, str]]:
    """``(name, local version, remote version)`` for each distribution both sides have with
    different major versions."""
    out = []
    for name in names:
        mine, theirs = local.get(name), remote.get(name)
        if not mine or not theirs:
            continue
        try:
            if Version(mine).major != Version(theirs).major:
                out.append((name, mine, theirs))
        except InvalidVersion:
            continue
    return out


def local_versions(names: Iterable[str] = RESULT_SENSITIVE) -> dict[str, str]:
    """This client's versions of ``names`` (those installed)."""
    return {n: v for n in names if (v := _installed_version(n))}


def warn_version_mismatch(provider: str, remote: Mapping[str, str],
                          local: Mapping[str, str] | None = None) -> list[str]:
    """Warn once per (distribution, client version, provider version) when a result comes from
    a provider with another major version of numpy or pandas; returns the messages warned."""
    said = []
    for name, mine, theirs in major_mismatches(local_versions() if local is None else local,
                                               remote):
        with _warned_lock:
            if (name, mine, theirs) in _warned:
                continue
            _warned.add((name, mine, theirs))
        text = (f"provider {provider} has {name} {theirs} and this client has {name} {mine}: "
                f"results holding {name} objects may decode wrongly across major versions. "
                f"Require packages=['{name}>={Version(mine).major},<{Version(mine).major + 1}']"
                f" to run only where they match.")
        warnings.warn(text, PackageWarning, stacklevel=2)
        said.append(text)
    return said


class ResultVersions:
    """The client's side of the numpy/pandas major-version warning: when a result decodes
    while numpy or pandas is loaded here, compare with the versions its provider advertised
    (``client.providers()``, asked at most once per ``refresh`` seconds, only for a provider not
    seen yet) and warn once per mismatch. Never raises: a warning must not break a result."""

    def __init__(self, fetch: Callable[[], Iterable[Any]], refresh: float = 30.0) -> None:
        self._fetch = fetch  # -> objects with ``id`` and ``packages`` (ProviderInfo)
        self._refresh = refresh
        self._known: dict[str, dict[str, str]] = {}
        self._checked: set[str] = set()  # providers compared already
        self._asked = float("-inf")
        self._lock = threading.Lock()

    def check(self, provider: str | None) -> list[str]:
        """Warn (once) if ``provider``'s numpy/pandas major differs; cheap after the first
        result of each provider (a set lookup: this runs on every decoded result)."""
        if not provider or provider in self._checked \
                or not any(name in sys.modules for name in RESULT_SENSITIVE):
            return []
        with self._lock:
            if provider not in self._known and time.monotonic() - self._asked > self._refresh:
                self._asked = time.monotonic()
                try:
                    for info in self._fetch():
                        self._known[info.id] = dict(getattr(info, "packages", None) or {})
                except Exception as exc:  # unreachable gateway: no warning this time
                    log.debug("provider packages unknown (%s)", exc)
            remote = self._known.get(provider)
            if remote is not None:
                self._checked.add(provider)
        return warn_version_mismatch(provider, remote) if remote else []
