"""Reporting of a provider: what it tells the gateway besides taking tasks.

Owns batching events and results into frames (``_finish``/``_flush``), streamed task output,
heartbeats with measured usage and load, the earnings it hears back, and the lifetime stats it
saves. Kept apart from :mod:`provider.provider` (connection and task execution) so each stays one
concept; :class:`provider.provider.Provider` mixes it in and owns the state it reads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace

from gateway import protocol as p
from provider import stats
from provider.environments import refreshed_packages
from provider.outbox import TaskOutput, event_frames, heartbeat_frames, result_frames

log = logging.getLogger("provider.provider")  # same logger as before the move: same log records

#: Usage of running tasks is reported this often (the gateway settles on these totals).
HEARTBEAT_SECONDS = 0.5
#: An idle provider (holding no task) beats once in this many heartbeat periods (5 s).
IDLE_HEARTBEAT_EVERY = 10
#: Heartbeats between two status lines in the provider's log (the CLI's status line).
STATUS_EVERY = 20
#: Heartbeats between two looks at the installed packages (about a minute; a change is sent to
#: the gateway).
PACKAGES_EVERY = 120
#: Query id of the periodic "earnings" question (replies to it update ``Provider.earnings``).
EARNINGS_QUERY = 1


def tokens_at(usage: dict[str, float], prices: dict[str, float]) -> float:
    """What ``usage`` is worth at ``prices``, before the gateway's fee."""
    return (usage.get("cpu_seconds", 0.0) * prices.get("cpu", 0.0)
            + usage.get("memory_gib_seconds", 0.0) * prices.get("memory", 0.0)
            + usage.get("gpu_seconds", 0.0) * prices.get("gpu", 0.0))


class Reporting:
    """Mixin of :class:`provider.provider.Provider`: its reports to the gateway and its
    operator. It holds no state of its own; ``Provider.__init__`` sets what it uses."""

    def _output(self, key: str, started: asyncio.TimerHandle, stream: str, text: str) -> None:
        """Streamed output, capped and cut (:class:`TaskOutput`); the task is announced as
        running first if it was not yet."""
        if not started.cancelled() and started.when() > asyncio.get_running_loop().time():
            started.cancel()
            self._emit(p.Event(key=key, kind="running"))
        out = self._outputs.get(key)
        if out is None:
            out = self._outputs[key] = TaskOutput(self.output_limit)
        out.add(stream, text)
        if out.pending:
            self._output_due.add(key)
            self._schedule_flush()


    def _on_reply(self, msg: p.Reply) -> None:
        if msg.id != EARNINGS_QUERY or msg.data is None:
            return
        try:
            self._earnings = float(msg.data)
        except (TypeError, ValueError):
            return
        if self._earnings_at_start is None:
            self._earnings_at_start = self._earnings
        if self._earnings_heard is not None:
            self._earnings_heard.set()

    @property
    def earnings(self) -> float:
        """Tokens this provider's account has earned in its lifetime (after the gateway's fee),
        as last heard from the gateway."""
        return self._earnings

    @property
    def session_earnings(self) -> float:
        """Tokens earned since this provider started serving (after the gateway's fee)."""
        return max(0.0, self._earnings - (self._earnings_at_start or self._earnings))

    def summary(self) -> str:
        """What this session did, for the operator (printed by the CLI when it stops)."""
        return (f"provider {self.ad.name}: {self.served} tasks served this session, "
                f"{self.cpu_seconds:.2f} CPU-s, {self.session_earnings:.6f} tokens earned this "
                f"session ({self.earnings:.6f} lifetime)")


    # ------------------------------------------------------------------ reporting

    def _finish(self, a: p.Assignment, result: p.Result, buffers: Sequence[memoryview] = (),
                dropped: int = 0) -> None:
        """Report a task: the rest of its output (and the truncation mark), then its result."""
        self._running.pop(a.key, None)  # a cancel from now on is answered as unknown
        out = self._outputs.pop(a.key, None)
        if dropped and out is None:
            out = TaskOutput(self.output_limit)
        if out is not None:
            out.note_dropped(dropped)
            self._events += [p.Event(key=a.key, kind="output", stream=stream, text=text)
                             for stream, text in out.close()]
        self._output_due.discard(a.key)
        self._log_task(a, result)
        self._results.append((result, list(buffers)))
        self._schedule_flush()

    def _log_task(self, a: p.Assignment, result: p.Result) -> None:
        usage = result.usage
        tokens = tokens_at(usage, self.ad.prices)
        self.cpu_seconds += usage.get("cpu_seconds", 0.0)
        self.tokens += tokens
        log.info("task %s for %s: %s in %.2f s, %.2f CPU-s, %.6f tokens at our prices",
                 a.key[-48:], a.account[:8], result.status, usage.get("wall_seconds", 0.0),
                 usage.get("cpu_seconds", 0.0), tokens)

    def _emit(self, event: p.Event) -> None:
        self._events.append(event)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Batch what finishes in one loop iteration into as few frames as the limits allow."""
        if not self._flush_pending and self._loop is not None:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._writer is None:
            self._events.clear()
            self._results.clear()  # the gateway re-queues tasks of a lost connection
            self._output_due.clear()
            return
        for key in sorted(self._output_due):
            out = self._outputs.get(key)
            if out is not None:
                self._events += [p.Event(key=key, kind="output", stream=stream, text=text)
                                 for stream, text in out.take()]
        self._output_due.clear()
        events, self._events = self._events, []
        for frame in event_frames(events):
            self._writer.send(frame)
        results, self._results = self._results, []
        for frame in result_frames(results, self.max_message):
            self._writer.send(frame)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeats(self) -> None:
        """Usage and load twice a second while tasks are held (the gateway settles on them and
        renews their leases); an idle provider beats every ``IDLE_HEARTBEAT_EVERY`` beats, and
        once at the moment it becomes idle (a thousand idle providers cost a gateway little)."""
        was_busy = False
        for beat in itertools.count():
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self.store.shed_spares()  # spares unused for a while, or past the room, are given up
            busy = bool(self._running)
            assert self._writer is not None
            if busy or was_busy or beat % IDLE_HEARTBEAT_EVERY == 0:
                self._send_heartbeat()
                if beat % (4 if busy else IDLE_HEARTBEAT_EVERY) == 0 or was_busy and not busy:
                    self._writer.send(p.encode(p.Query(id=EARNINGS_QUERY, what="earnings")))
            was_busy = busy
            if beat % PACKAGES_EVERY == 0 and beat:
                fresh = await asyncio.to_thread(refreshed_packages, self.ad.packages)
                if fresh is not None:  # installed or upgraded since: tell the gateway
                    self.ad = replace(self.ad, packages=fresh)
                    self._writer.send(p.encode(p.Packages(packages=fresh,
                                                          installs=self.ad.installs)))
            if beat % STATUS_EVERY == 0 and beat:
                self._save_stats()
                log.info("provider %s: %d tasks served this session, %d held, %.6f tokens "
                         "earned this session, %.6f lifetime", self.ad.name, self.served,
                         len(self._running), self.session_earnings, self.earnings)

    def _send_heartbeat(self) -> None:
        """Every task held is listed (a queued one with ``{}``): the gateway renews its lease."""
        if self._writer is None:
            return
        usage = self.held_usage()
        for frame in heartbeat_frames(self._load(usage), usage):
            self._writer.send(frame)

    def held_usage(self) -> dict[str, dict[str, float]]:
        """Cumulative usage of every task held; ``{}`` for one still waiting to run."""
        usage: dict[str, dict[str, float]] = {key: {} for key in self._running}
        for worker in self._pool.workers if self._pool is not None else []:
            key, meter = worker.task_key, getattr(worker, "meter", None)
            if meter is not None and key in usage:
                usage[key] = meter.sample(tree=True)
        return usage

    def _load(self, usage: dict[str, dict[str, float]]) -> dict[str, float]:
        """This provider's own load: cores its task processes kept busy since the last
        heartbeat, their resident memory, and how many tasks run (not the host's load)."""
        cpu, seen = 0.0, {}
        for key, u in usage.items():
            if not u:
                continue
            now_cpu, now_wall = u.get("cpu_seconds", 0.0), u.get("wall_seconds", 0.0)
            then_cpu, then_wall = self._load_prev.get(key, (0.0, 0.0))
            if now_wall > then_wall:
                cpu += max(0.0, now_cpu - then_cpu) / (now_wall - then_wall)
            seen[key] = (now_cpu, now_wall)
        self._load_prev = seen
        memory = 0
        for worker in self._pool.workers if self._pool is not None else []:
            meter = getattr(worker, "meter", None)
            if worker.task_key in seen and meter is not None:
                memory += meter.rss  # the whole tree's, sampled by held_usage() just before
        return {"cpu": round(min(cpu, float(self.cpus)), 3), "memory_bytes": float(memory),
                "running": float(len(seen)), "store_bytes": float(self.store.held),
                "store_limit": float(self.store.limit or 0)}

    def _save_stats(self) -> None:
        """Add what was served since the last save to this home's lifetime totals."""
        tasks, cpu = self.served - self._saved[0], self.cpu_seconds - self._saved[1]
        stats.add(self.home, tasks, cpu)
        self._saved = (self.served, self.cpu_seconds)

