"""``Client.refereed``: a step-wise computation run twice and refereed (Gensyn's Verde).

``client.refereed(step, state, n_steps, checkpoint_every=K)`` runs ``state = step(state, i)`` for
``i in range(n_steps)`` on two providers of distinct accounts; each commits the SHA-256 of the
state's canonical bytes (:func:`encode_state`) every ``K`` steps. The gateway compares the two
lists, bisects a disagreement to one segment of ``K`` steps and has a third provider re-run just
that segment from the agreed checkpoint; the provider the referee agrees with is paid, the other
is not (:mod:`gateway.core_referee`). The client checks the accepted run's checkpoints again and
decodes its final state through the safe-result allow-list.

Determinism is the user's part and the hashes' premise: float64, one BLAS thread (the run pins
OpenBLAS/MKL/OpenMP to one thread with ``threadpoolctl`` and the ``*_NUM_THREADS`` variables),
and the same library versions on every provider (``packages=["numpy==2.1.3"]`` pins them).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gateway import referee as rf
from notebook_ext import errors, requirements
from notebook_ext.futures import Future
from notebook_ext.serialize import dumps_args, dumps_function

#: Magic prefixes of the two canonical state encodings.
_ARRAY, _PICKLE = b"decompute-ndarray-v1\n", b"decompute-pickle-v1\n"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def encode_state(state: Any) -> bytes:
    """The canonical bytes of a state: a numpy array as its dtype, shape and raw (C-order)
    bytes; anything else as its pickle (protocol 5, in-band), deterministic for the plain
    values and arrays training states are made of."""
    np = _numpy()
    if np is not None and type(state) is np.ndarray:
        header = json.dumps({"dtype": state.dtype.str, "shape": list(state.shape)}).encode()
        return _ARRAY + header + b"\n" + np.ascontiguousarray(state).tobytes()
    return _PICKLE + pickle.dumps(state, protocol=5)


def decode_state(data: bytes | memoryview, loads: Callable[[bytes], Any] = pickle.loads) -> Any:
    """The state :func:`encode_state` made; ``loads`` decodes a pickled one (the client passes
    its safe loader: these bytes came from a provider)."""
    data = bytes(data)
    if data.startswith(_ARRAY):
        import numpy as np

        header, _, raw = data[len(_ARRAY):].partition(b"\n")
        meta = json.loads(header)
        return np.frombuffer(raw, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"]).copy()
    if data.startswith(_PICKLE):
        return loads(data[len(_PICKLE):])
    raise ValueError("not a decompute state encoding")


def _numpy() -> Any:
    import sys

    return sys.modules.get("numpy")


def run_segment(segment: Any, state_bytes: Any, step: Callable[[Any, int], Any]) -> tuple:
    """On the provider: run steps ``[start, stop)`` from the given state, one BLAS thread,
    committing each checkpoint. Returns ``(hashes, *checkpoint bytes)``, each an out-of-band
    buffer: the gateway reads them raw (see :mod:`gateway.referee`)."""
    for var in _THREAD_VARS:
        os.environ.setdefault(var, "1")
    start, stop, every = rf.parse_segment(bytes(segment))
    state = decode_state(state_bytes)
    try:
        from threadpoolctl import threadpool_limits
        limits: Any = threadpool_limits(1)
    except ImportError:  # no threadpoolctl: the environment variables are all we have
        limits = None
    hashes, states = [], []

    def commit(value: Any) -> None:
        data = encode_state(value)
        hashes.append(hashlib.sha256(data).digest())
        states.append(pickle.PickleBuffer(data))

    try:
        commit(state)
        for i in range(start, stop):
            state = step(state, i)
            if (i + 1) % every == 0 or i + 1 == stop:
                commit(state)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    return (pickle.PickleBuffer(b"".join(hashes)), *states)


class RefereedFuture(Future):
    """The future of a refereed run: its value is the final state; ``verification`` says what
    the gateway checked (``agreed``, or the disputed checkpoint and steps, the referee, the
    winner and the loser)."""

    start_hash: bytes = b""
    steps: int = 0
    every: int = 1

    def result(self, timeout: float | None = None) -> Any:
        value = super().result(timeout)
        if self._refereed is None:
            self._refereed = self._final_state(value)
        return self._refereed

    _refereed: Any = None

    def _final_state(self, value: Any) -> Any:
        """Check the accepted run's commitment again (the gateway's word is not enough) and
        decode its last checkpoint."""
        if not isinstance(value, tuple) or len(value) < 2:
            raise errors.UntrustedResultError(f"refereed task {self.key}: not a commitment")
        raw, states = bytes(value[0]), [bytes(s) for s in value[1:]]
        hashes = [raw[i:i + rf.HASH_LEN] for i in range(0, len(raw), rf.HASH_LEN)]
        want = len(rf.checkpoints(0, self.steps, self.every))
        if len(hashes) != want or len(states) != want or hashes[0] != self.start_hash or any(
                hashlib.sha256(s).digest() != h for s, h in zip(states, hashes, strict=True)):
            raise errors.VerificationFailed(
                f"refereed task {self.key}: the accepted run's checkpoints do not match its"
                " commitment or the starting state")
        return decode_state(states[-1], self._safe_loads)

    def _safe_loads(self, data: bytes) -> Any:
        return self.client._decode([memoryview(data)], self.trust, self.provider)


class Refereed:
    """The ``refereed`` method of :class:`notebook_ext.client.Client` (a mixin)."""

    def refereed(self, step: Callable[[Any, int], Any], state: Any, n_steps: int, *,
                 checkpoint_every: int = 10, key: str | None = None, trust: bool | None = None,
                 packages: list[str] | None = None, **keywords: Any) -> RefereedFuture:
        """Run ``state = step(state, i)`` for ``i`` in ``range(n_steps)`` on two providers of
        distinct accounts, refereed by a third on disagreement; the future's value is the final
        state. ``keywords`` are ``submit``'s reserved ones (``providers``, ``resources``,
        ``budget``, ``max_price``, ``timeout``, ``retries``); each run (and the referee's)
        holds its own escrow. ``step`` must be deterministic (see the module docstring)."""
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not (
                1 <= n_steps <= rf.MAX_STEPS):
            raise ValueError(f"n_steps must be an int in [1, {rf.MAX_STEPS}]")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or not (
                1 <= checkpoint_every <= n_steps):
            raise ValueError("checkpoint_every must be an int in [1, n_steps]")
        unknown = set(keywords) - {"providers", "resources", "budget", "max_price", "timeout",
                                   "retries"}
        if unknown or "redundancy" in keywords:
            raise TypeError(f"refereed() got unexpected keywords {sorted(unknown)}")
        initial = encode_state(state)
        args = (pickle.PickleBuffer(rf.segment_bytes(0, n_steps, checkpoint_every)),
                pickle.PickleBuffer(initial), step)
        opts = {"redundancy": 2, "retries": 2, **keywords}
        opts["packages"] = requirements.for_task(step, packages, (state,), {})
        self._check_ready()
        self._check_funds(opts, 1)
        func_hash, blob = dumps_function(run_segment)
        key = key or f"refereed-{getattr(step, '__name__', 'step')}-{uuid.uuid4().hex}"
        spec, payload = self._task(key, func_hash, dumps_args(args, {}), opts)
        spec = replace(spec, refereed={"steps": n_steps, "every": checkpoint_every})
        fut = self._send_refereed(spec, payload, {func_hash: blob}, trust)
        fut.start_hash, fut.steps, fut.every = (hashlib.sha256(initial).digest(), n_steps,
                                                checkpoint_every)
        return fut

    def _send_refereed(self, spec: Any, payload: list, funcs: dict[str, bytes],
                       trust: bool | None) -> RefereedFuture:
        frame = self._submit_frame([spec], [payload], funcs)
        fut = RefereedFuture(self, spec.key, self.trust if trust is None else trust)
        fut.verification = {"kind": "refereed", "status": "pending"}
        self._book.add([fut], [spec], [payload], funcs)
        self._send_soon(frame)
        for listener in self._submit_listeners:
            listener([fut])
        return fut


__all__ = ["RefereedFuture", "decode_state", "encode_state", "run_segment"]
