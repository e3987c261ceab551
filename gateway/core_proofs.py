"""Proofs: proof-carrying tasks (``decompute[zk]``) are paid only for a proof that verifies.

A task whose spec carries a :class:`gateway.zk_fields.ProofSpec` moves no tokens while it runs
(heartbeats record usage and enforce the budget, as for a replica whose vote is open). When its
provider reports it finished, the core holds the result (:class:`Proofs`, the owner of held
results) and asks the shell to verify the proof: :meth:`Proofs.take` hands out the checks, the
shell runs them off the event loop (:mod:`gateway.zk_verify`, CPU work) and feeds each verdict
back as an event, :meth:`ProofRules.proof_checked`. The core decides: a valid proof settles and
the result goes to the client with its receipt; an invalid one is not paid, the escrow goes back,
the provider's reputation drops, and the task fails with ``VerificationFailed`` saying why. A
proof task that fails or is lost is not paid either: no proof, no pay.

Part of :class:`gateway.hub.Hub` (a mixin: the rules; the state lives in :class:`Proofs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from gateway import chunks
from gateway import protocol as p
from gateway.billing import price_micro
from gateway.outcomes import failure, outcome_digest, settled_leaf
from gateway.registry import ProviderConn
from gateway.tasks import Task, TaskState
from gateway.zk_fields import ProofSpec
from gateway.zk_verify import available

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Held:
    """A proof task's finished result, waiting for its proof's verdict."""

    task: Task
    provider_id: str
    provider_account: str
    prices: dict
    result: p.Result
    buffers: list[memoryview]


@dataclass(frozen=True, slots=True)
class ProofCheck:
    """An effect for the shell: verify ``buffers`` (a proof result) against ``spec``, then call
    ``Hub.proof_checked(task_id, ok, why)``."""

    task_id: str
    spec: ProofSpec
    buffers: list[memoryview]


@dataclass(slots=True)
class Proofs:
    """Held results by task id, and the checks the shell has not taken yet."""

    can_verify: bool = field(default_factory=available)
    held: dict[str, Held] = field(default_factory=dict)
    checks: list[ProofCheck] = field(default_factory=list)

    def hold(self, held: Held) -> None:
        task = held.task
        assert task.spec.proof is not None
        self.held[task.task_id] = held
        self.checks.append(ProofCheck(task.task_id, task.spec.proof, held.buffers))

    def take(self) -> list[ProofCheck]:
        checks, self.checks = self.checks, []
        return checks

    def live_escrows(self) -> set[str]:
        return {h.task.bill_id for h in self.held.values() if h.task.escrow_micro}


class ProofRules:
    """Admission, holding, and the verdict of proof-carrying tasks."""

    def _proof_refusal(self, spec: p.TaskSpec) -> p.Result | None:
        """A proof task on a gateway that cannot verify proofs is refused at submit."""
        if spec.proof is None or self.proofs.can_verify:
            return None
        return failure(spec.key, p.ErrorCode.NO_MATCH,
                       f"task {spec.key} requires a proof, but this gateway cannot verify proofs "
                       f"(ezkl is not installed where it runs: pip install 'decompute[zk]'); "
                       f"nothing was charged", "VerificationUnavailable")

    def _proof_result(self, task: Task, conn: ProviderConn, result: p.Result,
                      bufs: list[memoryview]) -> None:
        """A running proof task's outcome: a finished one waits for its proof's verdict; any
        other ends unpaid (its escrow goes back) and the client gets the error."""
        if result.status != "finished":
            self._end(task, TaskState(result.status))
            if task.escrow_micro:
                self.billing.refund([task.bill_id])
            answer = replace(result, key=task.key, provider=conn.id, usage=task.usage, cost=0.0)
            self._send_results_to(task.session, [(answer, bufs)])
            return
        self._end(task, TaskState.FINISHED)
        self.proofs.hold(Held(task, conn.id, conn.account, dict(conn.ad.prices), result, bufs))

    def proof_checked(self, task_id: str, ok: bool, why: str = "") -> None:
        """The shell's verdict on a held result's proof: settle it, or refuse it unpaid."""
        held = self.proofs.held.pop(task_id, None)
        if held is None:
            return
        task = held.task
        self.verifier.record(held.provider_account, ok)
        if not ok:
            self.counters.dropped["proof_invalid"] += 1
            log.warning("proof of task %s from %s refused: %s", task.key, held.provider_id, why)
            if task.escrow_micro:
                self.billing.refund([task.bill_id])
            self._send_results_to(task.session, [(failure(
                task.key, p.ErrorCode.VERIFY,
                f"provider {held.provider_id}'s proof for task {task.key} was refused by the "
                f"gateway: {why}. The provider was not paid and your escrow was returned",
                "VerificationFailed"), [])])
            return
        answer = replace(held.result, key=task.key, provider=held.provider_id,
                         usage=task.usage, cost=0.0)
        charge = None
        if task.escrow_micro:
            charge = self.billing.settle([(task.bill_id, held.provider_account, task.usage,
                                           held.prices, True)])[0]
        if charge is None:
            self._send_results_to(task.session, [(answer, held.buffers)])
            return
        digest = outcome_digest(held.result, held.buffers)
        self._send_logged(task.session, replace(answer, cost=charge.cost), held.buffers,
                          settled_leaf(task, charge, digest, [
                              (held.provider_account, digest, task.usage, held.prices, charge)],
                              chunks.item_hashes(held.result, held.buffers)), [task.bill_id])

    def _proof_over_budget(self, task: Task, prices: dict) -> bool:
        """A running proof task whose usage reached its escrow is stopped, unpaid (no proof
        was checked), and its escrow goes back. Returns whether it was stopped."""
        if not task.escrow_micro or price_micro(task.usage, prices) < task.escrow_micro:
            return False
        self._answered(task, TaskState.STOPPING, TaskState.ERROR)
        self.send_cancel(task.provider or "", [task])
        self.billing.refund([task.bill_id])
        what = (f"its budget of {task.spec.budget:g} tokens" if task.spec.budget is not None
                else "its escrow (the gateway's default; pass budget= to allow more)")
        self._send_results_to(task.session, [(failure(
            task.key, p.ErrorCode.BUDGET, f"proof task {task.key} used up {what} before it "
            f"returned a proof; it was stopped and nothing was charged", "BudgetExceeded"), [])])
        return True
