"""Provers for the ``decompute[zk]`` attack tests: a priced fake provider that really proves, then
(as the test says) lies about what it proved.

:class:`ZkProver` speaks the wire protocol (:class:`fakes.FakeProvider`), advertises ezkl, and for
each assignment runs the task's own prover (``notebook_ext.zk_prover.prove_inference``) here in
the test process, then applies its ``tamper`` to the proof envelope before it reports:

- ``None``: honest;
- ``"output"``: the proof's public output (the class scores) is changed, as a provider that
  wants another answer accepted would;
- ``"proof"``: a byte of the proof itself is flipped;
- ``"input"``: a valid proof, of the model on another input (cheaper to have at hand);
- ``"garbage"``: bytes that are no envelope at all.

This is a test helper: the product has no flag that makes a provider misbehave.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import numpy as np
from fakes import FakeProvider

PRICE = 1.0  # tokens per CPU-second
WORK = 0.3  # CPU-seconds a prover reports (the gateway caps it by the wall time it saw)


def tiny_model(seed: int = 0, n_in: int = 16, n_out: int = 4) -> tuple[bytes, np.ndarray]:
    """A logistic-regression scorer as ONNX bytes (Gemm), and a sample input for it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(n_in, n_out)) * 0.3).astype(np.float32)
    b = (rng.normal(size=n_out) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString(), rng.random(n_in)


def _edit_proof(envelope: bytes, edit: Any) -> bytes:
    data = msgpack.unpackb(envelope)
    doc = json.loads(data["proof"])
    edit(doc)
    data["proof"] = json.dumps(doc).encode()
    return msgpack.packb(data)


def _new_output(doc: dict) -> None:
    column = doc["instances"][0]
    column[-1] = column[0]  # the last class score becomes another field element
    doc["pretty_public_inputs"] = None  # and the "pretty" copy of it can say anything


def _flip_byte(doc: dict) -> None:
    raw = bytearray(bytes.fromhex(doc["hex_proof"].removeprefix("0x")))
    raw[len(raw) // 2] ^= 0x01
    doc["hex_proof"] = "0x" + raw.hex()
    doc["proof"] = list(raw)


TAMPER = {
    None: lambda envelope: envelope,
    "output": lambda envelope: _edit_proof(envelope, _new_output),
    "proof": lambda envelope: _edit_proof(envelope, _flip_byte),
    "garbage": lambda envelope: b"\x93not an envelope",
}


def ezkl_packages() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("ezkl", "numpy", "msgpack", "onnx")}


class ZkProver(FakeProvider):
    """A priced provider that proves each task it is given, then tampers as told."""

    def __init__(self, url: str, home: Path, *, name: str, tamper: str | None = None,
                 **kw: Any) -> None:
        super().__init__(url, home, name=name, prices={"cpu": PRICE}, **kw)
        self.ad = replace(self.ad, packages=ezkl_packages())
        self.tamper = tamper
        self.served: list[str] = []
        self._stop = threading.Event()
        self._serving: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> ZkProver:
        super().start(timeout)
        self._serving = threading.Thread(target=self._serve_all, daemon=True,
                                         name=f"prover-{self.ad.name}")
        self._serving.start()
        return self

    def close_serving(self, timeout: float = 10.0) -> None:
        """Stop answering assignments (the test answers them by hand)."""
        self._stop.set()
        if self._serving is not None:
            self._serving.join(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.close_serving(timeout)
        super().close(timeout)

    def _serve_all(self) -> None:
        while not self._stop.is_set():
            try:
                assignment, payload = self.next_assignment(timeout=0.2)
            except TimeoutError:
                continue
            self.serve(assignment, payload)

    def serve(self, assignment: Any, payload: list[memoryview]) -> None:
        from notebook_ext.zk_prover import prove_inference

        start = time.monotonic()
        args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])
        if self.tamper == "input":  # prove the same model on another input
            args = (*args[:-1], [0.0] * len(args[-1]))
        envelope = bytes(prove_inference(*args, **kwargs).raw())
        envelope = TAMPER[None if self.tamper == "input" else self.tamper](envelope)
        wall = max(WORK, time.monotonic() - start)
        self.served.append(assignment.key)
        self.finish(assignment.key, buffers=[b"\x80\x05N.", envelope],
                    usage={"cpu_seconds": WORK, "wall_seconds": wall})
