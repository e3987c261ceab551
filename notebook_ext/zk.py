"""Proof-carrying results (``decompute[zk]``): a small ONNX model proven on a provider with ezkl.

The client compiles the model into a Halo2 circuit once (:func:`compile_model`: settings, the
circuit, a locally generated SRS, the verifying key), cached on disk by the model's hash. A
proof task (:func:`submit_proof`) ships the circuit and SRS to a provider that has ezkl; the
provider runs the model on the input and returns a proof. The gateway verifies the proof with the
verifying key committed in the task before it pays anyone; the client verifies it again before
:meth:`ProofFuture.result` returns the outputs, which are read from the proof's verified public
outputs, never from anything else the provider sent.

What the proof says: *the circuit whose verifying key hashes to ``vk_hash`` (compiled from the
ONNX model whose SHA-256 is ``model``), run on exactly this (quantized) input, gives exactly
these (quantized) outputs*. It says nothing about whether the model is any good, and the
arithmetic is fixed point (``scale`` bits), so outputs differ from float inference by rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.zk_fields import ProofSpec
from gateway.zk_verify import ProofRejected, check_envelope, envelope_of
from notebook_ext.errors import VerificationFailed
from notebook_ext.futures import Future, RawResult

if TYPE_CHECKING:
    from notebook_ext.client import Client

log = logging.getLogger(__name__)

#: What a provider needs to prove (and so what proof tasks require of it).
ZK_REQUIREMENT = "ezkl>=23"
#: Largest circuit compiled by default: 2**13 rows (the SRS a task may ship is 1 MiB).
MAX_LOGROWS = 13
_FILES = ("model.onnx", "settings.json", "network.ezkl", "kzg.srs", "vk.key")


class ProofInvalid(VerificationFailed):
    """The provider's proof did not verify on the client (the gateway should have refused it)."""


@dataclass(frozen=True)
class ZkModel:
    """A compiled model: what proving needs (``circuit``, ``srs``) and verifying needs (``vk``,
    ``settings``, ``srs``). ``model`` is the SHA-256 of the ONNX bytes; ``vk_hash`` commits to the
    circuit (weights are fixed constants of the circuit, so they are in the verifying key)."""

    model: str
    path: Path
    circuit: bytes
    settings: bytes
    srs: bytes
    vk: bytes
    logrows: int
    input_scale: int
    output_scale: int
    input_shape: list[int]
    output_shape: list[int]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def vk_hash(self) -> str:
        return hashlib.sha256(self.vk).hexdigest()

    def quantize(self, x: Any) -> list[str]:
        """The input as the circuit sees it: field elements at ``input_scale``."""
        import ezkl

        flat = _flat(x)
        want = math.prod(self.input_shape)
        if len(flat) != want:
            raise ValueError(f"this model takes {want} input values {self.input_shape}, "
                             f"got {len(flat)}")
        return [ezkl.float_to_felt(v, self.input_scale) for v in flat]

    def spec(self, x: Any) -> ProofSpec:
        return ProofSpec(model=self.model, vk=self.vk, settings=self.settings, srs=self.srs,
                         inputs=self.quantize(x))

    def __repr__(self) -> str:
        return (f"ZkModel(model={self.model[:12]}, vk={self.vk_hash[:12]}, logrows={self.logrows},"
                f" in={self.input_shape}, out={self.output_shape})")


def _flat(x: Any) -> list[float]:
    import numpy as np

    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]


def cache_root() -> Path:
    home = os.environ.get("DECOMPUTE_HOME") or os.path.join(os.path.expanduser("~"), ".decompute")
    return Path(home) / "zk"


def compile_model(onnx_model: str | os.PathLike | bytes, sample: Any, *, scale: int = 8,
                  logrows: int | None = None, cache: Path | None = None) -> ZkModel:
    """Compile an ONNX model into a circuit (settings, circuit, SRS, verifying key), or load it
    from the cache (keyed by the model's hash and these options).

    ``sample`` is an example input: the circuit is checked on it (ezkl's mock prover), and the
    smallest ``logrows`` that fits is found when none is given. The SRS is generated here, never
    downloaded (ezkl's ``gen_srs``; see the README on what a locally made SRS means)."""
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    model = hashlib.sha256(data).hexdigest()
    folder = (cache or cache_root()) / f"{model[:32]}-s{scale}-k{logrows or 'auto'}"
    if all((folder / f).exists() for f in _FILES):
        log.info("zk model %s loaded from %s", model[:12], folder)
        return _load(folder, model, {})
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    try:
        seconds = _build(work, data, sample, scale, logrows)
        for scratch in ("input.json", "witness.json", "pk.key"):
            (work / scratch).unlink()
        try:  # published whole or not at all: a directory rename is atomic
            work.rename(folder)
        except OSError:  # another process published it first: theirs is as good
            log.info("zk model %s was compiled meanwhile; using %s", model[:12], folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("zk model %s compiled: %s", model[:12], seconds)
    return _load(folder, model, seconds)


def _build(work: Path, data: bytes, sample: Any, scale: int,
           logrows: int | None) -> dict[str, float]:
    """Settings, circuit, SRS and keys in ``work``; returns the seconds each step took."""
    import ezkl

    files = {name: str(work / name) for name in (*_FILES, "input.json", "witness.json",
                                                 "pk.key")}
    (work / "model.onnx").write_bytes(data)
    (work / "input.json").write_text(json.dumps({"input_data": [_flat(sample)]}))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    k = logrows or _rows_needed(files, scale)
    while True:
        _settings(files, scale, k)
        ezkl.compile_circuit(files["model.onnx"], files["network.ezkl"], files["settings.json"])
        ezkl.gen_witness(files["input.json"], files["network.ezkl"], files["witness.json"])
        try:
            ezkl.mock(files["witness.json"], files["network.ezkl"])
            break
        except Exception as exc:
            if logrows is not None or k >= MAX_LOGROWS:
                raise ValueError(f"the model does not fit a circuit of 2**{k} rows: {exc}") \
                    from None
            k += 1
    seconds["compile"] = time.perf_counter() - start
    start = time.perf_counter()
    ezkl.gen_srs(files["kzg.srs"], k)  # made here, never downloaded
    seconds["srs"] = time.perf_counter() - start
    start = time.perf_counter()
    ezkl.setup(files["network.ezkl"], files["vk.key"], files["pk.key"], files["kzg.srs"])
    seconds["setup"] = time.perf_counter() - start
    return seconds


def _settings(files: dict[str, str], scale: int, logrows: int) -> None:
    import ezkl

    args = ezkl.PyRunArgs()
    args.input_visibility = "public"  # the proof binds the input ...
    args.output_visibility = "public"  # ... and the output
    args.param_visibility = "fixed"  # weights are circuit constants: in the verifying key
    args.input_scale = args.param_scale = scale
    args.decomp_base, args.decomp_legs = 128, 3
    args.logrows = logrows
    ezkl.gen_settings(files["model.onnx"], files["settings.json"], py_run_args=args)


def _rows_needed(files: dict[str, str], scale: int) -> int:
    """The smallest logrows whose rows hold the circuit (with room for blinding rows)."""
    _settings(files, scale, 17)
    rows = json.loads(Path(files["settings.json"]).read_text())["num_rows"]
    return max(8, math.ceil(math.log2(rows + 16)))


def _load(folder: Path, model: str, seconds: dict[str, float]) -> ZkModel:
    settings = (folder / "settings.json").read_bytes()
    doc = json.loads(settings)
    shapes = doc["model_instance_shapes"]
    return ZkModel(
        model=model, path=folder, circuit=(folder / "network.ezkl").read_bytes(),
        settings=settings, srs=(folder / "kzg.srs").read_bytes(),
        vk=(folder / "vk.key").read_bytes(), logrows=doc["run_args"]["logrows"],
        input_scale=doc["model_input_scales"][0], output_scale=doc["model_output_scales"][0],
        input_shape=list(shapes[0]), output_shape=list(shapes[-1]), seconds=seconds)


class ProofFuture(Future):
    """The future of a proof task. ``result()`` verifies the proof (once, in the caller's
    thread) and returns the model's outputs as a float64 array of ``output_shape``; an invalid
    proof raises :class:`ProofInvalid`. ``verification`` says what was checked."""

    zk_model: ZkModel
    proof_spec: ProofSpec
    _proof_check: dict | None = None

    @property
    def verification(self) -> dict | None:
        """``{"kind": "proof", "verified": ..., "model", "vk_hash", ...}`` once done: verified
        here on first access (as ``result()`` does), or why the gateway refused the proof."""
        if self._proof_check is None and self.done() and not self.cancelled():
            error = super().exception()
            if error is None:
                with contextlib.suppress(ProofInvalid):
                    self.result()
            elif isinstance(error, VerificationFailed):
                self._proof_check = {"kind": "proof", "verified": False, "by": ["gateway"],
                                     "model": self.zk_model.model,
                                     "vk_hash": self.zk_model.vk_hash, "reason": str(error)}
        return self._proof_check or getattr(self, "_verification_other", None)

    @verification.setter
    def verification(self, value: dict | None) -> None:  # what other checks set
        self._verification_other = value

    @property
    def proof(self) -> bytes:
        """The envelope (msgpack: model, vk_hash, ezkl proof JSON), for verifying it yourself."""
        raw = cf_result(self)
        return envelope_of(raw.buffers)

    def result(self, timeout: float | None = None) -> Any:
        raw = cf_result(self, timeout)
        with self._decode_lock:
            if not self._decoded:
                self._decoded.append(self._verified_outputs(raw))
            return self._decoded[0]

    def _verified_outputs(self, raw: RawResult) -> Any:
        import ezkl
        import numpy as np

        try:
            checked = check_envelope(envelope_of(raw.buffers), self.proof_spec)
        except ProofRejected as exc:
            self._proof_check = {"kind": "proof", "verified": False, "model": self.zk_model.model,
                                 "vk_hash": self.zk_model.vk_hash, "reason": str(exc)}
            raise ProofInvalid(f"task {self.key}: provider {self.provider}'s proof was refused "
                               f"by the client: {exc}") from None
        scale = self.zk_model.output_scale
        outputs = np.array([ezkl.felt_to_float(f, scale) for f in checked.outputs])
        self._proof_check = {
            "kind": "proof", "verified": True, "model": checked.model,
            "vk_hash": checked.vk_hash, "proof_hash": checked.proof_hash,
            "provider": self.provider, "verify_seconds": round(checked.seconds, 4),
            "by": ["gateway", "client"]}
        return outputs.reshape(self.zk_model.output_shape)


def cf_result(fut: ProofFuture, timeout: float | None = None) -> RawResult:
    """The raw result of ``fut`` (its remote error raised as ``Future.result`` raises it)."""
    import concurrent.futures as cf

    try:
        raw = cf.Future.result(fut, timeout)
    except cf.TimeoutError:
        if fut.done():
            raise
        raise TimeoutError(f"proof task {fut.key} did not finish within {timeout} s") from None
    if not isinstance(raw, RawResult):
        raise ProofInvalid(f"task {fut.key}: a proof task's result must arrive whole")
    return raw


def submit_proof(client: Client, zk_model: ZkModel, x: Any, *, key: str | None = None,
                 providers: Any = None, resources: dict | None = None,
                 max_price: float | None = None, budget: float | None = None,
                 timeout: float | None = None, retries: int = 2,
                 packages: Any = None) -> ProofFuture:
    """Prove ``zk_model`` on input ``x`` on a provider with ezkl (:meth:`ZkMethods.prove`)."""
    from notebook_ext import requirements
    from notebook_ext.client import _opts
    from notebook_ext.serialize import dumps_args, dumps_function
    from notebook_ext.zk_prover import prove_inference

    opts = _opts(providers, resources, max_price, budget, 1, timeout, retries)
    args = (zk_model.circuit, zk_model.srs, zk_model.model, zk_model.vk_hash, _flat(x))
    opts["packages"] = requirements.for_task(
        prove_inference, [*(packages or ()), ZK_REQUIREMENT], args, {})
    client._check_ready()
    client._check_funds(opts, 1)
    func_hash, blob = dumps_function(prove_inference)
    key = key or f"prove-{zk_model.model[:8]}-{os.urandom(6).hex()}"
    spec, payload = client._task(key, func_hash, dumps_args(args, {}), opts)
    spec = replace(spec, proof=zk_model.spec(x))
    fut = client._send_tasks([spec], [payload], {func_hash: blob}, None, make=ProofFuture)[0]
    assert isinstance(fut, ProofFuture)
    fut.zk_model, fut.proof_spec = zk_model, spec.proof
    return fut


class ZkMethods:
    """``Client``'s proof-carrying methods (a mixin; ``decompute[zk]`` needs ezkl and onnx)."""

    def zk_compile(self, onnx_model: str | os.PathLike | bytes, sample: Any, *, scale: int = 8,
                   logrows: int | None = None) -> ZkModel:
        """Compile an ONNX model (a path or its bytes) into a proving circuit, on this machine:
        settings, circuit, a locally generated SRS and the verifying key, cached under
        ``$DECOMPUTE_HOME/zk`` by the model's hash. ``sample`` is an example input (the circuit
        is checked on it); ``scale`` the fixed-point bits; ``logrows`` the circuit's size
        (default: the smallest that fits, at most 2**13 rows)."""
        return compile_model(onnx_model, sample, scale=scale, logrows=logrows)

    def prove(self, zk_model: ZkModel, x: Any, **keywords: Any) -> ProofFuture:
        """Run ``zk_model`` on input ``x`` on a provider with ezkl, which returns the output
        with a zero-knowledge proof of it. The gateway verifies the proof before anyone is paid
        (an invalid one fails the task with ``VerificationFailed`` and returns the escrow); the
        future's ``result()`` verifies it again and returns the proven outputs (a float array);
        ``fut.verification`` says what was checked. ``keywords``: ``key``, ``providers``,
        ``resources``, ``max_price``, ``budget``, ``timeout``, ``retries``, ``packages``, as
        ``submit`` takes them."""
        return submit_proof(self, zk_model, x, **keywords)  # type: ignore[arg-type]
