"""Checking a proof envelope: the CPU work behind ``decompute[zk]``, shared by gateway and client.

A proof task's result is two buffers: a tiny pickle stream the worker wrote (ignored here) and
the **envelope**, msgpack ``{"v": 1, "model": hex, "vk_hash": hex, "proof": <ezkl proof JSON>}``
(:mod:`notebook_ext.zk_prover` makes it). :func:`check_envelope` accepts it only if

1. it is well formed and names the committed model and verifying-key hash,
2. the proof's public inputs are exactly the committed (quantized) inputs, and
3. ezkl verifies the proof with the committed verifying key, settings and SRS.

It then returns the proof's public outputs, the only outputs anyone should believe: the
``pretty_public_inputs`` a proof file also carries are not covered by the proof. Nothing here
unpickles; the proof JSON is parsed with :mod:`json`, size-bounded. This runs off the gateway's
event loop (its shell hands it to a thread) and in the client's user thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from gateway.zk_fields import ProofSpec

#: An ezkl proof of a small circuit is ~30 KiB of JSON; this bounds a hostile one.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


class ProofRejected(Exception):
    """The envelope is malformed, about another model or input, or its proof does not verify."""


@dataclass(frozen=True, slots=True)
class Checked:
    """A verified proof: its public outputs (field elements) and what verifying took."""

    model: str
    vk_hash: str
    outputs: list[str]
    proof_hash: str
    seconds: float


@functools.cache
def available() -> bool:
    """Whether this process can verify proofs (ezkl imports)."""
    try:
        import ezkl  # noqa: F401
    except ImportError:
        return False
    return True


def envelope_of(buffers: Sequence[memoryview | bytes]) -> bytes:
    """The envelope bytes of a proof task's result buffers."""
    if len(buffers) != 2:
        raise ProofRejected(f"a proof result is 2 buffers (stream, envelope), got {len(buffers)}")
    return bytes(buffers[1])


def check_envelope(envelope: bytes, spec: ProofSpec) -> Checked:
    """Verify ``envelope`` against the requirement ``spec``; raises :class:`ProofRejected`."""
    start = time.perf_counter()
    data = _unpack(envelope)
    if data.get("model") != spec.model:
        raise ProofRejected(f"the proof is about model {str(data.get('model'))[:16]}, not the "
                            f"committed {spec.model[:16]}")
    if data.get("vk_hash") != spec.vk_hash:
        raise ProofRejected(f"the proof names verifying key {str(data.get('vk_hash'))[:16]}, "
                            f"not the committed {spec.vk_hash[:16]}")
    proof = data.get("proof")
    if not isinstance(proof, bytes):
        raise ProofRejected("the envelope carries no proof bytes")
    instances = _instances(proof)
    n_in = len(spec.inputs)
    if [x.lower() for x in instances[:n_in]] != list(spec.inputs):
        raise ProofRejected("the proof's public inputs are not the committed input")
    if len(instances) <= n_in:
        raise ProofRejected("the proof has no public outputs")
    _ezkl_verify(proof, spec)
    return Checked(spec.model, spec.vk_hash, instances[n_in:],
                   hashlib.sha256(proof).hexdigest(), time.perf_counter() - start)


def _unpack(envelope: bytes) -> dict:
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise ProofRejected(f"the envelope is over {MAX_ENVELOPE_BYTES} bytes")
    try:
        data = msgpack.unpackb(envelope, raw=False, strict_map_key=True,
                               max_bin_len=MAX_ENVELOPE_BYTES, max_str_len=1024,
                               max_array_len=16, max_map_len=16)
    except Exception as exc:  # any malformed msgpack: refused, never a crash
        raise ProofRejected(f"the envelope is not msgpack: {type(exc).__name__}") from None
    if not isinstance(data, dict) or data.get("v") != 1:
        raise ProofRejected("the envelope is not a version-1 proof envelope")
    return data


def _instances(proof: bytes) -> list[str]:
    """The proof's public instances (one column), as hex strings."""
    try:
        doc = json.loads(proof)
        column = doc["instances"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ProofRejected("the proof is not an ezkl proof (no instances)") from None
    if (not isinstance(column, list) or len(doc["instances"]) != 1
            or not all(isinstance(x, str) and len(x) == 64 for x in column)):
        raise ProofRejected("the proof's instances are not one column of field elements")
    return column


def _ezkl_verify(proof: bytes, spec: ProofSpec) -> None:
    import ezkl

    with tempfile.TemporaryDirectory(prefix="zk-verify-") as tmp:
        d = Path(tmp)
        paths = {}
        for name, content in (("proof.json", proof), ("settings.json", spec.settings),
                              ("vk.key", spec.vk), ("kzg.srs", spec.srs)):
            paths[name] = str(d / name)
            (d / name).write_bytes(content)
        try:
            ok = ezkl.verify(paths["proof.json"], paths["settings.json"], paths["vk.key"],
                             paths["kzg.srs"])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # RuntimeError for a bad proof; a Rust panic is a Base one
            raise ProofRejected(f"the proof does not verify: {str(exc)[:200]}") from None
    if ok is not True:
        raise ProofRejected("the proof does not verify")
