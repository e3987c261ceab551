"""The provider side of a proof-carrying task: run a compiled model on an input and prove it.

This function travels to the provider as an ordinary task (by reference: the provider imports
this small module, which imports nothing heavy at load time) and runs inside its sandbox. It
needs ``ezkl`` there, which is why :meth:`notebook_ext.Client.prove` requires
``packages=["ezkl>=23"]``: only providers that advertise ezkl get the task.

What it returns is not a Python value for the client to unpickle but the **proof envelope**:
msgpack bytes (:mod:`gateway.zk_verify` reads them) wrapped in a ``pickle.PickleBuffer``, so
the worker ships them as the result's second, out-of-band buffer, byte for byte. The gateway and
the client both read that buffer directly; neither unpickles anything of a proof task.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tempfile
from pathlib import Path

ENVELOPE_VERSION = 1


def prove_inference(circuit: bytes, srs: bytes, model: str, vk_hash: str,
                    inputs: list[float]) -> pickle.PickleBuffer:
    """Run the circuit on ``inputs`` and prove it; returns the proof envelope.

    The proving key is made here from the circuit and the SRS (key generation is deterministic,
    so it matches the client's verifying key: checked by hash before proving), because it is
    megabytes while the circuit and SRS are kilobytes."""
    import ezkl
    import msgpack

    with tempfile.TemporaryDirectory(prefix="zk-") as tmp:
        d = Path(tmp)
        (d / "network.ezkl").write_bytes(circuit)
        (d / "kzg.srs").write_bytes(srs)
        (d / "input.json").write_text(json.dumps({"input_data": [list(map(float, inputs))]}))
        files = {name: str(d / name) for name in
                 ("network.ezkl", "kzg.srs", "input.json", "witness.json", "vk.key", "pk.key",
                  "proof.json")}
        ezkl.setup(files["network.ezkl"], files["vk.key"], files["pk.key"], files["kzg.srs"])
        made = hashlib.sha256((d / "vk.key").read_bytes()).hexdigest()
        if made != vk_hash:
            raise ValueError(f"the circuit and SRS shipped with this task give verifying key "
                             f"{made[:16]}, not the committed {vk_hash[:16]}: the client's "
                             f"artifacts are inconsistent")
        ezkl.gen_witness(files["input.json"], files["network.ezkl"], files["witness.json"])
        ezkl.prove(files["witness.json"], files["network.ezkl"], files["pk.key"],
                   files["proof.json"], files["kzg.srs"])
        proof = (d / "proof.json").read_bytes()
    envelope = msgpack.packb({"v": ENVELOPE_VERSION, "model": model, "vk_hash": vk_hash,
                              "proof": proof})
    return pickle.PickleBuffer(envelope)
