"""The gateway's asyncio shell: websockets in, decoded messages to the hub, frames out.

Each connection must answer a fresh challenge before anything else is read; a hello that breaks
the protocol closes that connection with a reason saying which rule. After it, one bad frame never
ends a connection: it is answered with an ``Error`` naming the rule, counted and dropped; only a
peer that keeps sending garbage (``Limits.bad_frames`` in ``Limits.bad_frame_window`` seconds) is
closed. Every other connection keeps being served. ``GET /health`` and ``GET /metrics`` answer on
the same port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gateway import protocol as p
from gateway import transfers
from gateway.accounting_worker import AccountingWorker
from gateway.chunks import FEATURES
from gateway.handshake import Handshake
from gateway.hub import Hub
from gateway.identity import Identity
from gateway.limits import TokenBucket
from gateway.metrics import render_prometheus
from gateway.proof_shell import ProofChecker
from gateway.receipt_log import ReceiptLog, log_http
from gateway.registry import ProviderConn
from gateway.transport import PING_INTERVAL, PING_TIMEOUT, FrameWriter

log = logging.getLogger(__name__)

#: A peer must answer the challenge within this many seconds or be closed: bounds how long a
#: silent socket can hold a connection slot.
AUTH_TIMEOUT = 10.0
#: Largest websocket message accepted (a task's arguments or a result travel in one message).
#: websockets refuses anything larger with close code 1009 before buffering it.
DEFAULT_MAX_MESSAGE = 512 * 1024 * 1024

CLIENT_TYPES = frozenset({"submit", "cancel", "query", "fetch", "release", "chunk", "abort",
                          "scatter", "drop"})
#: A provider may answer a frame it could not read with an ``error`` (it stays connected).
PROVIDER_TYPES = frozenset({"results", "events", "heartbeat", "query", "data", "error",
                            "packages", "chunk", "abort", "evicted"})
#: Bytes of blob chunks that may wait for one destination's socket: past it the gateway stops
#: reading the source (cut-through with back-pressure; bounds memory per transfer).
BLOB_WINDOW = 16 * 1024 * 1024
POLICY = 1008  # close code: policy violation (auth, schema, unknown type)
#: Seconds a refused peer has to complete the closing handshake before its socket is dropped.
CLOSE_TIMEOUT = 2.0
#: Frames larger than this are decoded in a worker thread, so that parsing one 10,000-task header
#: (a few hundred ms of CPU) does not stop every other connection for that long.
DECODE_IN_THREAD = 256 * 1024
#: A submit or cancel is handed to the hub this many tasks at a time, other connections served
#: between the slices.
SLICE = 1_000


def _respond(connection: ServerConnection, body: str, content_type: str) -> Response:
    response = connection.respond(HTTPStatus.OK, body)
    del response.headers["Content-Type"]  # respond() set text/plain; say what the body is
    response.headers["Content-Type"] = content_type
    return response


class GatewayServer:
    """Serves one hub on one host:port until :meth:`stop`."""

    def __init__(self, hub: Hub, identity: Identity, host: str = "127.0.0.1", port: int = 8765,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.hub = hub
        self.ledger = hub.billing.ledger  # the shell's reads: loads, a restarted session's past
        self.accounting: AccountingWorker | None = None
        self.proof_checker: ProofChecker | None = None
        self.identity = identity
        self.host = host
        self.port = port
        self.max_message = max_message
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        #: Each live connection's writer, by transfer end point: back-pressure for blobs.
        self.writers: dict[tuple[str, str], FrameWriter] = {}
        #: Bytes received and sent per connection ("client:<session>", "provider:<id>").
        self.traffic: dict[str, list[int]] = {}
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Accept connections until stopped; then close every connection (1001), commit what
        the accounting worker still holds, and return."""
        loop = asyncio.get_running_loop()
        self.accounting = AccountingWorker(
            self.ledger, ReceiptLog(self.ledger.path), self.identity,
            lambda done: loop.call_soon_threadsafe(self._react, "committed", self.hub.committed,
                                                   done))
        self.accounting.start()
        self.proof_checker = ProofChecker(lambda task_id, ok, why: loop.call_soon_threadsafe(
            self._react, "proof", self.hub.proof_checked, task_id, ok, why))
        try:
            await self._serve()
        finally:
            self.proof_checker.stop()
            self._flush()
            await asyncio.to_thread(self.accounting.stop)
            self.accounting.log.close()

    async def _serve(self) -> None:
        async with serve(
            self._handle, self.host, self.port, process_request=self._http,
            compression=None, max_size=self.max_message, ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
        ) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1] if self.port == 0 else self.port
            log.info("gateway listening on %s (key %s)", self.url, self.identity.account[:16])
            self.started.set()
            async with asyncio.TaskGroup() as tg:
                sweeper = tg.create_task(self._sweep_forever())
                worker = tg.create_task(self._work_forever())
                await self._stop.wait()
                sweeper.cancel()
                worker.cancel()
            server.close(close_connections=True)
            await server.wait_closed()
        log.info("gateway stopped")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._react("sweep", self.hub.sweep)
            self._flush(idle=True)  # also picks up an operator's mint while nothing runs

    async def _work_forever(self) -> None:
        """The hub's deferred bulk work (a long chain failing), a slice at a time, with every
        connection served between slices."""
        more = asyncio.Event()
        self.hub.wake = more.set
        while True:
            await more.wait()
            more.clear()
            while self.hub.later:
                self._react("deferred work", self.hub.work)
                await asyncio.sleep(0)

    # ------------------------------------------------------------------ HTTP

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/health":
            return _respond(connection, json.dumps(self.health()) + "\n", "application/json")
        if path == "/metrics":
            text = render_prometheus(self.hub.counters, self.hub.gauges())
            return _respond(connection, text, "text/plain; version=0.0.4")
        if path.startswith("/log/"):
            return self._log_http(connection, request.path)
        return None

    def _log_http(self, connection: ServerConnection, target: str) -> Response | None:
        """``/log/head``, ``/log/inclusion``, ``/log/consistency``, ``/log/entries``: the receipt
        log, read-only, for anyone (JSON; an error is ``{"error": ...}`` with its status)."""
        answer = log_http(self.hub.billing.log, target)
        if answer is None:
            return None
        status, body = answer
        response = _respond(connection, json.dumps(body) + "\n", "application/json")
        if status != HTTPStatus.OK:
            response = dataclasses.replace(response, status_code=status,
                                           reason_phrase=HTTPStatus(status).phrase)
        return response

    def health(self) -> dict:
        gauges = self.hub.gauges()
        return {
            "status": "ok", "protocol": p.VERSION, "gateway_key": self.identity.account,
            "providers": int(gauges["providers_online"]),
            "provider_names": [c.ad.name for c in self.hub.registry],
            "clients": int(gauges["clients_connected"]),
            "tasks": {"pending": int(gauges["tasks_pending"]),
                      "running": int(gauges["tasks_running"])},
            "pid": os.getpid(),
            "blobs": {"transfers": len(self.hub.blobs.transfers),
                      "bytes_moved": self.hub.blobs.moved_bytes},
            "traffic": {peer: {"in": n[0], "out": n[1]} for peer, n in self.traffic.items()},
        }

    # ------------------------------------------------------------------ websockets

    def _count_sent(self, nbytes: int) -> None:
        self.hub.counters.bytes_out += nbytes
        self.hub.counters.frames_out += 1

    async def _handle(self, ws: ServerConnection) -> None:
        hs = Handshake(str(ws.remote_address))
        try:
            hello = await self._authenticate(ws, hs)
        except p.ProtocolError as exc:
            await self._refuse(ws, exc)
            return
        except ConnectionClosed:
            hs.leave()
            return
        outbound = FrameWriter(ws, self._count_sent, self.hub.limits.writer_bytes)
        async with asyncio.TaskGroup() as tg:
            writer = tg.create_task(outbound.run())
            try:
                await self._serve_peer(ws, hs, hello, outbound)
            finally:
                writer.cancel()

    async def _serve_peer(self, ws: ServerConnection, hs: Handshake, hello: p.Hello,
                          out: FrameWriter) -> None:
        """Serve one authenticated peer; every way it can end is handled here, not raised."""
        try:
            if hello.role == "client":
                await self._serve_client(ws, hs, hello, out)
            else:
                await self._serve_provider(ws, hs, hello, out)
            hs.leave()
        except p.ProtocolError as exc:
            hs.refuse()
            await self._refuse(ws, exc)
        except ConnectionClosed:
            hs.leave()
        except Exception:  # a bug must cost one connection, never the gateway
            hs.leave()
            log.exception("internal error on connection %s", ws.remote_address)
            await ws.close(1011, "internal: the gateway hit an error; see its log")

    async def _refuse(self, ws: ServerConnection, exc: p.ProtocolError) -> None:
        """Close with the rule's reason; a peer that does not complete the closing handshake
        (it keeps flooding us, unread) is cut off after ``CLOSE_TIMEOUT``."""
        self.hub.counters.refused[exc.code.value] += 1
        log.info("closing %s: %s", ws.remote_address, exc.reason)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await ws.close(POLICY, exc.reason)
        except TimeoutError:
            ws.transport.abort()

    def _react(self, what: str, react: Any, *args: Any, tasks: Iterable[str] = ()) -> None:
        """Call the hub through its failure boundary (:meth:`Hub.contain`: a bug handling one
        message fails the ``tasks`` it concerned and returns their escrow; the gateway and the
        connection live on). The ledger work it decided goes to the accounting worker."""
        self.hub.contain(what, tasks, react, *args)
        self._flush()

    def _answer(self, account: str, peer: str, q: p.Query) -> p.Reply | None:
        """The core's answer to a query (None: it follows later); a bug answering it is an
        error reply, not a close."""
        try:
            return self.hub.query(account, peer, q)
        except Exception:
            self.hub.counters.refused[p.ErrorCode.INTERNAL.value] += 1
            log.exception("internal error answering query %r", q.what)
            return p.Reply(id=q.id, error="internal: the gateway could not answer; see its log",
                           code=p.ErrorCode.INTERNAL.value)

    def _reply(self, out: FrameWriter, reply: p.Reply | None) -> None:
        """Send a query's answer now, or (None) hand what it booked to the accounting worker."""
        if reply is not None:
            out.send(p.encode(reply))
        self._flush()

    async def _load_payee(self, args: dict) -> None:
        """A transfer's payee, loaded (off the loop) if the ledger knows it; an account it has
        never seen stays unloaded and the core refuses the transfer (no faucet for a typo)."""
        payee = args.get("to") if isinstance(args, dict) else None
        if (transfers.is_account(payee) and not self.hub.billing.accounts.loaded(payee)
                and await asyncio.to_thread(self.ledger.known, payee)):
            await self._load(payee)

    def _flush(self, idle: bool = False) -> None:
        """Hand the core's journal to the accounting worker (an empty one too when ``idle``:
        the worker then looks for movements written from outside)."""
        accounts = self.hub.billing.accounts
        if self.proof_checker is not None:  # CPU work: verified off the loop, verdicts back
            for check in self.hub.proofs.take():
                self.proof_checker.submit(check)
        if self.accounting is not None and (accounts.journal or idle):
            self.accounting.submit(*accounts.take_journal())

    async def _load(self, account: str) -> None:
        """The account's books, read from the ledger (off the loop) the first time it is seen."""
        accounts = self.hub.billing.accounts
        if not accounts.loaded(account) and self.accounting is not None:
            balance, earnings = await asyncio.wrap_future(self.accounting.load(account))
            accounts.load(account, balance, earnings)

    async def _authenticate(self, ws: ServerConnection, hs: Handshake) -> p.Hello:
        await ws.send(hs.challenge(self.identity.public_bytes))
        try:
            async with asyncio.timeout(AUTH_TIMEOUT):
                data = await ws.recv()
        except TimeoutError:
            hs.refuse()
            msg = f"no hello within {AUTH_TIMEOUT:.0f} s"
            raise p.ProtocolError(p.ErrorCode.AUTH, msg) from None
        msg = hs.receive_hello(data)
        self.hub.counters.connections[msg.role] += 1
        return msg

    def _track(self, peer: tuple[str, str], out: FrameWriter) -> str:
        """Count a new connection's traffic and know its writer (for back-pressure); returns
        its label in ``/health``'s ``traffic``."""
        label = f"{'client' if peer[0] == 'c' else 'provider'}:{peer[1]}"
        self.writers[peer] = out
        out.on_sent = self._count(label, 1)
        return label

    async def _relay(self, peer: tuple[str, str], msg: p.Chunk, buffers: list) -> None:
        """A blob chunk: forwarded at once; the sender is read again once it has drained."""
        self._react("chunk", self.hub.chunk, peer, msg, buffers)
        await self._drain()

    async def _drain(self) -> None:
        """Wait until every writer a chunk just went to holds at most ``BLOB_WINDOW``: the
        source is not read meanwhile, so a slow receiver slows its sender, not our memory."""
        peers, self.hub.pressure = self.hub.pressure, []
        for peer in peers:
            writer = self.writers.get(peer)
            if writer is not None:
                await writer.drained(BLOB_WINDOW)

    def _count(self, label: str, direction: int) -> Callable[[int], None]:
        counts = self.traffic.setdefault(label, [0, 0])

        def count(nbytes: int) -> None:
            counts[direction] += nbytes
            if direction:
                self._count_sent(nbytes)
        return count

    async def _messages(self, ws: ServerConnection, allowed: frozenset[str], out: FrameWriter,
                        label: str = ""):
        """Decoded messages from an authenticated peer. A bad frame is answered with an
        ``Error`` and dropped; too many in a short window raise ProtocolError (a close).

        Past the message-rate limit, reading slows down (and the peer is told once).
        """
        limits = self.hub.limits
        bucket, warned = TokenBucket(limits.messages_per_second, limits.burst), False
        bad: deque[float] = deque()
        async for data in ws:
            delay = bucket.take()
            if delay > 0:
                if not warned:
                    warned = True
                    self.hub.counters.refused[p.ErrorCode.RATE.value] += 1
                    out.send(p.encode(p.Error(
                        code=p.ErrorCode.RATE.value,
                        message=f"over {limits.messages_per_second:g} messages/s: slowed down; "
                                f"batch your work (map) to send fewer messages")))
                await asyncio.sleep(delay)
            try:
                if isinstance(data, str):
                    raise p.ProtocolError(p.ErrorCode.BAD_FRAME, "text frames are not accepted")
                self.hub.counters.bytes_in += len(data)
                self.hub.counters.frames_in += 1
                if label:
                    self.traffic.setdefault(label, [0, 0])[0] += len(data)
                if p.header_length(data) > DECODE_IN_THREAD:
                    decoded = await asyncio.to_thread(p.decode, data, allowed)
                else:
                    decoded = p.decode(data, allowed=allowed)
            except p.ProtocolError as exc:
                self._bad_frame(exc, bad, out)
                continue
            yield decoded

    def _bad_frame(self, exc: p.ProtocolError, bad: deque[float], out: FrameWriter) -> None:
        """Drop one bad frame with an ``Error`` saying why; a peer over the bad-frame limit is
        closed (the ProtocolError propagates)."""
        limits = self.hub.limits
        now = time.monotonic()
        bad.append(now)
        while bad and now - bad[0] > limits.bad_frame_window:
            bad.popleft()
        if len(bad) > limits.bad_frames:
            raise p.ProtocolError(exc.code, f"{len(bad)} bad frames in "
                                  f"{limits.bad_frame_window:g} s; the last: {exc}")
        self.hub.counters.refused[exc.code.value] += 1
        log.info("dropped a bad frame: %s", exc.reason)
        out.send(p.encode(p.Error(code=exc.code.value,
                                  message=f"frame dropped: {exc}"[:p.MAX_TEXT_LEN])))

    async def _serve_client(self, ws: ServerConnection, hs: Handshake, hello: p.Hello,
                            out: FrameWriter) -> None:
        account = hello.key.hex()
        if not self.hub.may_attach(account, hello.session):
            raise p.ProtocolError(p.ErrorCode.AUTH, "that session belongs to another account")
        await self._load(account)
        prepaid: set[str] | None = None
        if hello.session not in self.hub.sessions:  # a restart may have cut it: ask the ledger
            prepaid = await asyncio.to_thread(self.ledger.settled_under, f"{hello.session}/")
        if not self.hub.may_attach(account, hello.session):  # raced while we waited
            raise p.ProtocolError(p.ErrorCode.AUTH, "that session belongs to another account")
        # the welcome goes first: attaching flushes results that waited for this session
        out.send(p.encode(p.Welcome(account=account, session=hello.session,
                                    gateway=self.identity.public_bytes,
                                    max_message=self.max_message, features=FEATURES)))
        hs.welcome()
        session = self.hub.attach_client(account, hello.session, out.send, prepaid)
        peer = ("c", session.id)
        label = self._track(peer, out)
        try:
            async for msg, buffers in self._messages(ws, CLIENT_TYPES, out, label):
                if isinstance(msg, p.Chunk):
                    await self._relay(peer, msg, buffers)
                elif isinstance(msg, p.Submit):
                    for part, bufs in submit_slices(msg, buffers):
                        self._react("submit", self.hub.submit, session, part, bufs,
                                    tasks=[f"{session.id}/{t.key}" for t in part.tasks])
                        await asyncio.sleep(0)
                elif isinstance(msg, p.Cancel):
                    for i in range(0, len(msg.keys), SLICE):
                        keys = msg.keys[i:i + SLICE]
                        self._react("cancel", self.hub.cancel, session, keys,
                                    tasks=[f"{session.id}/{k}" for k in keys])
                        await asyncio.sleep(0)
                elif isinstance(msg, p.Fetch):
                    self._react("fetch", self.hub.fetch, session, msg.keys)
                elif isinstance(msg, p.Release):
                    self._react("release", self.hub.release, session, msg.keys)
                elif isinstance(msg, p.Query):
                    if msg.what == "transfer":
                        await self._load_payee(msg.args)
                    self._reply(out, self._answer(account, session.id, msg))
                elif isinstance(msg, p.Abort):
                    self._react("abort", self.hub.abort, peer, msg)
                elif isinstance(msg, p.Scatter):
                    self._react("scatter", self.hub.scatter, session, msg)
                elif isinstance(msg, p.Drop):
                    self._react("drop", self.hub.drop, session, msg)
        finally:
            if self.writers.get(peer) is out:
                del self.writers[peer]
            if session.send_fn == out.send:
                self._react("detach", self.hub.detach_client, session,
                            out.take_unsent())  # kept for the reconnect

    async def _serve_provider(self, ws: ServerConnection, hs: Handshake, hello: p.Hello,
                              out: FrameWriter) -> None:
        assert hello.ad is not None
        account = hello.key.hex()
        await self._load(account)
        conn = ProviderConn(id=self.hub.registry.free_id(hello.ad.name, account), account=account,
                            ad=hello.ad, send=out.send)
        out.send(p.encode(p.Welcome(account=conn.account, session=conn.id,
                                    gateway=self.identity.public_bytes,
                                    max_message=self.max_message)))
        hs.welcome()
        self.hub.join_provider(conn)
        peer = ("p", conn.id)
        label = self._track(peer, out)
        try:
            async for msg, buffers in self._messages(ws, PROVIDER_TYPES, out, label):
                if isinstance(msg, p.Chunk):
                    await self._relay(peer, msg, buffers)
                elif isinstance(msg, p.Results):
                    served = conn.served
                    self._react("results", self.hub.results, conn, msg, buffers,
                                tasks=[r.key for r in msg.results])
                    self.hub.standing.delivered(conn.account, conn.served - served)
                elif isinstance(msg, p.Events):
                    self._react("events", self.hub.events, conn, msg,
                                tasks=[e.key for e in msg.events])
                elif isinstance(msg, p.Data):
                    self._react("data", self.hub.data, conn, msg, buffers)
                elif isinstance(msg, p.Heartbeat):
                    self._react("leases", self.hub.renew, conn, msg.usage)
                    self._react("heartbeat", self.hub.heartbeat, conn, msg, tasks=list(msg.usage))
                elif isinstance(msg, p.Query):
                    self._reply(out, self._answer(conn.account, conn.id, msg))
                elif isinstance(msg, p.Packages):
                    self._react("packages", self.hub.packages, conn, msg)
                elif isinstance(msg, p.Abort):
                    self._react("abort", self.hub.abort, peer, msg)
                elif isinstance(msg, p.Evicted):
                    self._react("evicted", self.hub.evicted, conn, msg)
                elif isinstance(msg, p.Error):
                    log.warning("provider %s could not read a message: %s: %s", conn.id,
                                msg.code, msg.message[:500])
        finally:
            if self.writers.get(peer) is out:
                del self.writers[peer]
            self._react("leave", self.hub.leave_provider, conn.id)


def submit_slices(msg: p.Submit, buffers: list[memoryview]
                  ) -> list[tuple[p.Submit, list[memoryview]]]:
    """A submit cut into submits of at most ``SLICE`` tasks (each with the function blobs), in
    order: the hub handles a slice at a time."""
    if len(msg.tasks) <= SLICE:
        return [(msg, buffers)]
    nfuncs = len(msg.funcs)
    funcs, payloads = buffers[:nfuncs], buffers[nfuncs:]
    out, pos = [], 0
    for i in range(0, len(msg.tasks), SLICE):
        tasks = msg.tasks[i:i + SLICE]
        n = sum(t.nb for t in tasks)
        out.append((p.Submit(tasks=tasks, funcs=msg.funcs), [*funcs, *payloads[pos:pos + n]]))
        pos += n
    return out
