"""The shell's side of proof checking: ezkl verification on a worker thread, off the event loop.

The core (:mod:`gateway.core_proofs`) decides; this only verifies. After each event the server
takes the core's pending checks (``hub.proofs.take()``) and hands them here; each verdict goes
back to the core as an event through ``done(task_id, ok, why)``, which the server makes a
thread-safe call into its loop. One thread: a small proof verifies in milliseconds, and ezkl
spends most of it outside the GIL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from gateway.core_proofs import ProofCheck
from gateway.zk_verify import ProofRejected, check_envelope, envelope_of

log = logging.getLogger(__name__)


def run_check(check: ProofCheck) -> tuple[bool, str]:
    """Verify one held result; never raises (a crash in the verifier refuses the proof)."""
    try:
        checked = check_envelope(envelope_of(check.buffers), check.spec)
    except ProofRejected as exc:
        return False, str(exc)
    except Exception as exc:
        log.exception("verifying the proof of %s failed", check.task_id)
        return False, f"the verifier failed on it ({type(exc).__name__})"
    log.info("proof of %s verified in %.3f s", check.task_id, checked.seconds)
    return True, ""


class ProofChecker:
    """A one-thread pool that verifies proofs and reports each verdict through ``done``."""

    def __init__(self, done: Callable[[str, bool, str], None]) -> None:
        self._done = done
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="proof-verify")

    def submit(self, check: ProofCheck) -> None:
        fut = self._pool.submit(run_check, check)
        fut.add_done_callback(lambda f: self._report(check.task_id, f))

    def _report(self, task_id: str, fut: Future) -> None:
        if fut.cancelled():
            return
        ok, why = fut.result()
        self._done(task_id, ok, why)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
