"""Checks for the resource and package fields of task specs and provider advertisements.

Split out of :mod:`gateway.protocol` (which re-exports every name here): these checks parse
PEP 508 requirements and distribution maps with ``packaging`` and bound their sizes, a concept of
their own beside the message records that use them. :mod:`gateway.packages`, the client's
requirement inference and the provider's environments share :func:`parse_requirement`'s cache.
"""

from __future__ import annotations

import functools
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from gateway.schema import (
    Check,
    ErrorCode,
    ProtocolError,
    integer,
    list_of,
    mapping,
    number,
    string,
)

RESOURCE_CHECKS: dict[str, Check] = {
    "cpus": number(0, 4096),
    "memory": integer(0, 2**50),
    "gpus": number(0, 64),
}


def resource_map(name: str, value: Any) -> dict:
    """``{"cpus": 1, "memory": bytes, "gpus": 0}``; unknown resource names are refused."""
    value = mapping(8)(name, value)
    for k, v in value.items():
        if k not in RESOURCE_CHECKS:
            raise ProtocolError(ErrorCode.SCHEMA, f"{name}: unknown resource {k!r}")
        RESOURCE_CHECKS[k](f"{name}.{k}", v)
    return value


#: Requirements one task may declare. Each is parsed on the gateway at every provider it is
#: matched against (cached), so this bounds a spec's matching work and its share of a header.
MAX_REQUIREMENTS = 64
#: Characters of one PEP 508 requirement string ("scikit-learn>=1.5,<2; python_version>'3.9'").
MAX_REQUIREMENT_LEN = 200
#: Distributions one provider may advertise. A large scientific environment has a few hundred;
#: 2,000 bounds the advertisement to about 60 KiB of header and the matching table it builds.
MAX_PACKAGES = 2_000
#: Characters of a distribution name and of a version string in an advertisement.
MAX_PACKAGE_NAME = 100
MAX_VERSION_LEN = 64


@functools.lru_cache(maxsize=4096)
def parse_requirement(text: str) -> Requirement:
    """A PEP 508 requirement, parsed once per distinct string (specs repeat them per task).

    Direct references (``name @ URL``) are refused: a provider installs only from its own index,
    never from an address a client names."""
    req = Requirement(text)
    if req.url:
        raise InvalidRequirement(f"{text!r} names a URL; a provider installs only from its own "
                                 f"index: give a name and a version range instead")
    return req


def requirement_list(name: str, value: Any) -> list:
    """Up to ``MAX_REQUIREMENTS`` PEP 508 strings, each parsed (not just length-checked)."""
    value = list_of(string(MAX_REQUIREMENT_LEN), MAX_REQUIREMENTS)(name, value)
    for i, text in enumerate(value):
        try:
            parse_requirement(text)
        except InvalidRequirement as exc:
            raise ProtocolError(ErrorCode.SCHEMA, f"{name}[{i}]: not a PEP 508 requirement "
                                f"({exc})") from None
    return value


def package_map(name: str, value: Any) -> dict:
    """``{canonical distribution name: version}``, bounded in entries and lengths."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be a map")
    if len(value) > MAX_PACKAGES:
        raise ProtocolError(ErrorCode.TOO_BIG, f"field {name!r} has over {MAX_PACKAGES} entries")
    for k, v in value.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_PACKAGE_NAME \
                or canonicalize_name(k) != k:
            raise ProtocolError(ErrorCode.SCHEMA, f"{name}: {str(k)[:40]!r} is not a canonical "
                                f"distribution name of at most {MAX_PACKAGE_NAME} characters")
        if not isinstance(v, str) or not 0 < len(v) <= MAX_VERSION_LEN:
            raise ProtocolError(ErrorCode.SCHEMA, f"{name}.{k}: the version must be a string of "
                                f"1 to {MAX_VERSION_LEN} characters")
    return value
