"""Package matching: which requirements a provider's advertised distributions leave unmet.

Pure functions over the wire's vocabulary (PEP 508 strings from a task, ``{name: version}``
from a provider's advertisement); no I/O, and nothing here ever installs or imports a package.
Names are compared canonicalized (``Scikit_Learn`` is ``scikit-learn``) and versions with
``packaging`` specifiers, pre-releases admitted as pip admits an *installed* version
(``SpecifierSet.contains(v, prereleases=True)``): a provider that has ``2.0.0rc1`` meets
``numpy>=1.26``. A marker is evaluated for the provider's Python (its runtime), the rest of the
environment as the gateway's own (both Linux CPython in practice).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from packaging.markers import default_environment
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from gateway.protocol import ProviderAd, parse_requirement

#: Distributions shown for a provider in ``client.providers()`` and the panel: the libraries
#: whose presence decides where a data-science task can run. Others stay in the advertisement
#: (matching uses all of them), not in the table.
NOTABLE = (
    "numpy", "pandas", "scipy", "scikit-learn", "torch", "tensorflow", "jax", "polars",
    "pyarrow", "xgboost", "lightgbm", "statsmodels", "numba", "dask", "matplotlib", "sympy",
    "networkx", "transformers", "opencv-python", "pillow",
)
#: Providers named, at most, in a no-match message (the rest are counted).
MESSAGE_PROVIDERS = 5


@functools.lru_cache(maxsize=4096)
def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


@functools.lru_cache(maxsize=64)
def _marker_env(python: str) -> dict[str, str]:
    env = dict(default_environment())
    if python:
        env["python_version"] = python
        env["python_full_version"] = f"{python}.0"
    return env


def applies(requirement: str, python: str = "") -> bool:
    """Whether a requirement's marker (if any) holds on a provider running ``python``."""
    req = parse_requirement(requirement)
    return req.marker is None or req.marker.evaluate(_marker_env(python))


def met(requirement: str, packages: Mapping[str, str], python: str = "") -> bool:
    """Whether ``packages`` (``{canonical name: version}``) meet one PEP 508 requirement."""
    req = parse_requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(_marker_env(python)):
        return True  # not for this provider's environment: nothing to meet
    have = packages.get(canonicalize_name(req.name))
    if have is None:
        return False
    if not req.specifier:
        return True
    version = _version(have)
    return version is not None and req.specifier.contains(version, prereleases=True)


def unmet(requirements: Iterable[str], packages: Mapping[str, str], installs: bool = False,
          python: str = "") -> list[str]:
    """The requirements a provider cannot meet, in the task's order; [] when it can run it.

    A provider that installs (``--install-packages``) can meet any requirement: it builds an
    environment for what it lacks (a requirement its index cannot serve fails the task then,
    with pip's reason)."""
    if installs:
        return []
    return [r for r in requirements if not met(r, packages, python)]


def ad_unmet(requirements: Iterable[str], ad: ProviderAd) -> list[str]:
    """:func:`unmet` for a provider's advertisement (its packages, installs and Python)."""
    return unmet(requirements, ad.packages, ad.installs, ad.runtime.python)


def notable(packages: Mapping[str, str]) -> dict[str, str]:
    """The :data:`NOTABLE` distributions a provider has, for tables."""
    return {name: packages[name] for name in NOTABLE if name in packages}


def _has(requirement: str, ad: ProviderAd) -> str:
    """What one provider has of a requirement's distribution, for a message."""
    name = canonicalize_name(parse_requirement(requirement).name)
    version = ad.packages.get(name)
    return f"{ad.name} has {name} {version}" if version else f"{ad.name} has no {name}"


def no_match_message(requirements: Iterable[str], providers: Iterable[Any]) -> str | None:
    """Why no provider online meets the requirements, naming each unmet one and what the
    providers have of it; None when some provider meets them all (or none is online).

    ``providers`` are registry entries (anything with an ``ad``) or advertisements."""
    reqs = list(requirements)
    ads = [getattr(p, "ad", p) for p in providers]
    if not reqs or not ads or any(not ad_unmet(reqs, ad) for ad in ads):
        return None
    missing = list(dict.fromkeys(r for ad in ads for r in ad_unmet(reqs, ad)))
    parts = []
    for req in missing:
        lacking = [ad for ad in ads if req in ad_unmet([req], ad)]
        shown = "; ".join(_has(req, ad) for ad in lacking[:MESSAGE_PROVIDERS])
        more = len(lacking) - MESSAGE_PROVIDERS
        parts.append(f"{req!r} ({shown}{f'; and {more} more' if more > 0 else ''})")
    return (f"no online provider meets the task's packages: {', '.join(parts)}. No provider "
            f"online installs packages; relax the requirement, or start a provider that has it "
            f"(or one with --install-packages).")
