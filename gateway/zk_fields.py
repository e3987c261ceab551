"""The wire form of a proof-carrying task: what the client commits to when it asks for a proof.

A task with ``TaskSpec.proof`` set is only paid for a zero-knowledge proof (ezkl, Halo2 over
KZG) that verifies against the verifying key shipped here, for the model named here, on the
inputs committed here. Everything is plain bytes and strings: the gateway parses this header as
it parses every other (msgpack, bounded, checked field by field) and never unpickles anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

from gateway.schema import Check, ErrorCode, ProtocolError, Record, blob, list_of, string

#: A verifying key of a small circuit is a few KiB; this bounds a hostile one.
MAX_VK_BYTES = 1024 * 1024
#: Circuit settings (JSON).
MAX_SETTINGS_BYTES = 256 * 1024
#: The SRS the proof is checked against: 2**13 rows at most (1 MiB), so that one task header
#: stays well inside ``schema.MAX_HEADER_BYTES``. Bigger circuits are not what this is for.
MAX_SRS_BYTES = 1024 * 1024 + 4096
#: Public inputs (field elements, 64 hex digits each) one task may commit to.
MAX_INPUTS = 4096


def _hex64(name: str, value: object) -> str:
    text = string(64)(name, value)
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise ProtocolError(ErrorCode.SCHEMA, f"field {name!r} must be 64 lowercase hex digits")
    return text


@dataclass(frozen=True, slots=True)
class ProofSpec(Record):
    """A proof requirement: ``model`` is the SHA-256 of the ONNX model the circuit was compiled
    from; ``vk``, ``settings`` and ``srs`` are what the proof is verified with; ``inputs`` the
    quantized public inputs (field elements as ezkl prints them) the proof must be about."""

    model: str
    vk: bytes
    settings: bytes
    srs: bytes
    inputs: list = field(default_factory=list)
    SCHEMA: ClassVar[dict[str, Check]] = {
        "model": _hex64, "vk": blob(max_len=MAX_VK_BYTES),
        "settings": blob(max_len=MAX_SETTINGS_BYTES), "srs": blob(max_len=MAX_SRS_BYTES),
        "inputs": list_of(_hex64, MAX_INPUTS),
    }

    @property
    def vk_hash(self) -> str:
        return hashlib.sha256(self.vk).hexdigest()

    def problem(self) -> str | None:
        if not self.vk or not self.settings or not self.srs:
            return "a proof requirement needs its verifying key, settings and SRS"
        return None
