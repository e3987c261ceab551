"""The task process: runs client code inside the sandbox, one task at a time.

Started by :mod:`provider.pool` (through :mod:`provider.sandbox`) with one end of a socket pair as
its only channel: ``python -m provider.worker FD``. It is the only place a task payload is ever
unpickled on a provider. It owns nothing else: it has no key, no network, no ledger.

Channel frames are ``u64 length | protocol frame`` (see :func:`gateway.protocol.encode_frame`):
provider -> worker ``run`` (buffers: function blob if new, then the argument payload) and
``exit``; worker -> provider ``ready``, ``out`` (stdout/stderr text), ``done`` (buffers: the
result) and ``fail`` (a structured error, never a pickle).

A ``run`` with ``parts`` is a chunk of a ``map``: the function runs on each item in turn (item
``i``'s argument stream is the next ``parts[i]`` buffers), an item that raises does not stop the
others, and ``done`` carries a manifest first (msgpack ``{"parts", "failed", "errors"}``: each
item's result buffer count, the items that raised and their errors), then the items' buffers.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

from gateway.protocol import decode_frame, frame_parts, scratch
from provider.shared_memory import (
    MAX_FDS,
    SHARE_FROM,
    let_go,
    map_received,
    received_fds,
    rights,
    sealed_copy,
)

LENGTH = struct.Struct("!Q")
#: Deserialized functions kept per worker (FIFO). The provider remembers half as many as sent, so
#: whatever it believes we hold, we hold.
FUNCS_KEPT = 512
#: Streamed output is sent at the latest this long after it was printed.
OUTPUT_FLUSH_SECONDS = 0.1
#: Output is sent in messages of at most this many characters.
OUTPUT_CHUNK_CHARS = 16 * 1024
#: Output a task may send when the provider names no limit (it names its own, the same default).
OUTPUT_LIMIT = 1024 * 1024
#: A result pickled with more out-of-band buffers than this is pickled again in-band: one message
#: carries at most 65,536 buffers.
MAX_RESULT_BUFFERS = 4096
#: Error text (message and traceback) one chunk's failed items may send in all: a chunk's
#: result header must stay far under the protocol's header limit however many items raise.
CHUNK_ERROR_CHARS = 256 * 1024


class Channel:
    """Blocking length-prefixed frames over the socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        #: Mappings of the descriptors received for the task in hand (see ``let_go``).
        self.mapped: list = []

    def send(self, header: dict, buffers: list | tuple = ()) -> None:
        self.transmit(*self.prepare(header, buffers))

    def prepare(self, header: dict, buffers: list | tuple = (), own: bool = False
                ) -> tuple[list, list[int]]:
        """A frame's parts and descriptors: big buffers copied into sealed memfds. With
        ``own``, the others are copied too, so the frame holds no view of a task's memory."""
        fds: list[int] = []
        if any(memoryview(b).nbytes >= SHARE_FROM for b in buffers):  # big: sealed memfds
            table, kept = [], []
            for i, b in enumerate(buffers):
                if memoryview(b).nbytes >= SHARE_FROM and len(fds) < MAX_FDS:
                    fds.append(sealed_copy(memoryview(b)))
                    table.append([i, memoryview(b).nbytes])
                    kept.append(b"")
                else:
                    kept.append(b)
            header, buffers = {**header, "fds": table}, kept
        if own:
            buffers = [b if isinstance(b, bytes) else bytes(b) for b in buffers]
        return frame_parts(header, buffers), fds

    def transmit(self, parts: list, fds: list[int]) -> None:
        size = sum(memoryview(b).nbytes for b in parts)
        with self.lock:
            if fds:
                try:
                    self.sock.sendmsg([LENGTH.pack(size)], rights(fds))
                    for part in parts:
                        self.sock.sendall(part)
                finally:
                    for fd in fds:
                        os.close(fd)
            elif size < 65536:  # one syscall for the common small frame
                self.sock.sendall(LENGTH.pack(size) + b"".join(parts))
            else:  # no copy of a large result
                self.sock.sendall(LENGTH.pack(size))
                for part in parts:
                    self.sock.sendall(part)

    def recv(self) -> tuple[dict, list[memoryview]] | None:
        head, fds = self._prefix()
        if head is None:
            return None
        body = self._exactly(LENGTH.unpack(head)[0])
        if body is None:
            return None
        header, buffers = decode_frame(body, max_header=2**31)
        if header.get("fds") or fds:  # big buffers came as descriptors to map, not as bytes
            buffers = map_received(buffers, header.get("fds") or [], fds, self.mapped)
        return header, buffers

    def _prefix(self) -> tuple[bytes | None, list[int]]:
        """The frame's length prefix, and the descriptors sent along with its first byte."""
        data, ancdata, _, _ = self.sock.recvmsg(LENGTH.size, socket.CMSG_SPACE(4 * MAX_FDS))
        fds = received_fds(ancdata)
        if not data:
            return None, fds
        if len(data) < LENGTH.size:
            rest = self._exactly(LENGTH.size - len(data))
            if rest is None:
                return None, fds
            data += bytes(rest)
        return data, fds

    def _exactly(self, n: int) -> bytearray | None:
        buf = scratch(n)
        view, pos = memoryview(buf), 0
        while pos < n:
            got = self.sock.recv_into(view[pos:])
            if not got:
                return None
            pos += got
        return buf


class StreamToChannel(io.TextIOBase):
    """sys.stdout/sys.stderr for the task: text goes to the provider in bounded chunks.

    Text is sent when OUTPUT_CHUNK_CHARS have gathered or, by :class:`Flusher`, at the latest
    OUTPUT_FLUSH_SECONDS after it was written: 200,000 quick prints travel as a few dozen
    messages, and a line printed before a long computation still shows at once. Past ``limit``
    characters the rest is counted (``dropped``), not sent; the provider enforces its own cap
    anyway, since a task can write to the channel directly.
    """

    def __init__(self, channel: Channel, name: str, limit: int | None = None) -> None:
        self.channel = channel
        self.name = name
        self.limit = OUTPUT_LIMIT if limit is None else limit
        self.parts: list[str] = []
        self.size = 0  # characters waiting in parts
        self.sent = 0  # characters accepted for sending
        self.dropped = 0  # UTF-8 bytes over the limit
        self.first = 0.0  # when the oldest waiting text was written
        self.closed_for_task = False
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self.lock:
            if self.closed_for_task:
                return len(text)
            room = self.limit - self.sent
            kept = text if len(text) <= room else text[:max(room, 0)]
            if len(kept) < len(text):
                self.dropped += len(text[len(kept):].encode("utf-8", "replace"))
            if kept:
                if not self.parts:
                    self.first = time.monotonic()
                self.parts.append(kept)
                self.size += len(kept)
                self.sent += len(kept)
            if self.size >= OUTPUT_CHUNK_CHARS:
                self._send()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self._send()

    def flush_if_due(self, now: float) -> None:
        with self.lock:
            if self.parts and now - self.first >= OUTPUT_FLUSH_SECONDS:
                self._send()

    def finish(self) -> int:
        """Send what is left, stop sending for good; returns the bytes dropped."""
        with self.lock:
            self._send()
            self.closed_for_task = True
            return self.dropped

    def _send(self) -> None:  # with self.lock held: chunks leave in the order written
        text, self.parts, self.size = "".join(self.parts), [], 0
        for pos in range(0, len(text), OUTPUT_CHUNK_CHARS):
            chunk = text[pos:pos + OUTPUT_CHUNK_CHARS].encode("utf-8", "replace").decode()
            self.channel.send({"t": "out", "stream": self.name, "text": chunk})


class Flusher:
    """A thread that sends the current task's waiting output when it is due."""

    def __init__(self) -> None:
        self.streams: tuple[StreamToChannel, ...] = ()
        thread = threading.Thread(target=self._run, name="output-flush", daemon=True)
        thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(OUTPUT_FLUSH_SECONDS / 2)
            now = time.monotonic()
            for stream in self.streams:
                with contextlib.suppress(Exception):  # the channel may be gone: main sees it
                    stream.flush_if_due(now)


def describe_error(exc: BaseException) -> dict:
    """An exception as data: type, module, message and the traceback of the task's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next  # the task's frames are what the user needs, not ours
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"type": type(exc).__qualname__, "module": type(exc).__module__,
            "message": str(exc)[:100_000], "traceback": text[-100_000:]}


def apply_memory_limit(task_bytes: int | None) -> int | None:
    """Let the task allocate ``task_bytes`` beyond what this worker already maps (soft
    RLIMIT_AS, under the provider's hard cap); None restores the cap. Returns the limit set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if task_bytes is None:
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return None if hard == resource.RLIM_INFINITY else hard
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + task_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return task_bytes


def memory_message(limit: int | None, original: str) -> str:
    if limit is None:
        return f"the task ran out of memory ({original or 'MemoryError'})"
    return (f"the task ran out of memory: it may allocate {limit / 2**20:.0f} MiB "
            f"(resources memory= or the provider's per-task cap); ask for more memory or use "
            f"less ({original or 'MemoryError'})")


def load_deps(keys: list[str], nbs: list[int], buffers: list[memoryview]) -> dict[str, Any]:
    """The values of a graph task's dependencies, keyed as the client named them."""
    import cloudpickle

    deps, pos = {}, 0
    for key, n in zip(keys, nbs, strict=True):
        bufs = buffers[pos:pos + n]
        pos += n
        deps[key.split("/", 1)[-1]] = cloudpickle.loads(bufs[0], buffers=bufs[1:])
    return deps


def dumps_result(value: Any) -> list:
    """Pickle protocol 5 with out-of-band buffers: arrays leave without a copy into the stream."""
    import cloudpickle

    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if len(buffers) > MAX_RESULT_BUFFERS:  # thousands of small arrays: one stream is better
        return [cloudpickle.dumps(value, protocol=5)]
    return [data, *(b.raw() for b in buffers)]


def _own_copy(part: memoryview) -> Any:
    """A scattered value's buffer, copied once into this process's own, aligned memory: every
    later task here reads it, and the part sits at an unaligned offset of the shared blob
    (numpy takes a slow path over unaligned float64) in small-paged shared memory."""
    view = memoryview(part).cast("B")
    if view.nbytes < (64 << 10):
        return bytearray(view)  # a copy all the same: the blob's mapping is let go after the task
    try:
        import numpy

        buf = numpy.empty(view.nbytes, dtype=numpy.uint8)  # aligned, huge pages where allowed
    except ImportError:
        buf = bytearray(view.nbytes)
    memoryview(buf).cast("B")[:] = view
    return buf


class Worker:
    """The run loop: receive a task, run it, answer with its result or its error."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.funcs: OrderedDict[str, Any] = OrderedDict()
        self.scattered: OrderedDict[str, Any] = OrderedDict()  # values, LRU (see scattered.py)
        self.flusher = Flusher()

    def serve(self) -> None:
        self.channel.send({"t": "ready", "pid": os.getpid()})
        while True:
            frame = self.channel.recv()
            if frame is None or frame[0].get("t") == "exit":
                return
            reply = self.channel.prepare(*self.run(*frame), own=bool(self.channel.mapped))
            del frame  # nothing here holds the task's buffers any more
            let_go(self.channel.mapped)  # before answering: see provider.spares
            self.channel.transmit(*reply)

    def run(self, header: dict, buffers: list[memoryview]) -> tuple[dict, list]:
        """Run one task; the answer to send (the caller sends it once the task's buffers are
        let go)."""
        import cloudpickle

        key = header["key"]
        limit = apply_memory_limit(header.get("memory"))
        output_limit = header.get("output_limit")
        out = StreamToChannel(self.channel, "stdout", output_limit)
        err = StreamToChannel(self.channel, "stderr", output_limit)
        sys.stdout, sys.stderr = out, err
        self.flusher.streams = (out, err)
        try:
            fn = self._function(header["func"], buffers[0] if header.get("has_func") else None)
            rest = buffers[1:] if header.get("has_func") else buffers
            if header.get("scat") and header.get("parts"):
                rest = self._load_scattered(header["scat"], rest)
                header["scat"] = None
            if header.get("parts"):
                del buffers
                result = self._run_chunk(fn, header["parts"], rest, limit)
                dropped = self._end_output(out, err)
                return {"t": "done", "key": key, "dropped": dropped}, result
            if header.get("scat"):
                rest = self._load_scattered(header["scat"], rest)
            nb = header.get("nb", len(rest))
            payload, dep_buffers = rest[:nb], rest[nb:]
            args, kwargs = cloudpickle.loads(payload[0], buffers=payload[1:])
            if "deps" in header:  # a graph task: its first argument maps dep keys to values
                args = (load_deps(header["deps"], header["dep_nbs"], dep_buffers), *args)
            value = fn(*args, **kwargs)
            del args, kwargs, payload, buffers, rest, dep_buffers
            result = dumps_result(value)
        except BaseException as exc:  # noqa: BLE001 - every task failure is reported, not raised
            dropped = self._end_output(out, err)
            error = describe_error(exc)
            if isinstance(exc, MemoryError):  # numpy's subclass too: the user sees MemoryError
                error.update(type="MemoryError", module="builtins",
                             message=memory_message(limit, error["message"]))
            return {"t": "fail", "key": key, "error": error, "dropped": dropped}, []
        else:
            dropped = self._end_output(out, err)
            return {"t": "done", "key": key, "dropped": dropped}, result
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            apply_memory_limit(None)

    def _load_scattered(self, entries: list, buffers: list) -> list:
        """Fill ``provider.scattered.TABLE`` with the values this task names; the buffers of
        values sent along sit at the end of ``buffers`` (returned without them)."""
        import cloudpickle

        from gateway.framing import decode_frame
        from provider import scattered

        sent = sum(n for _, n in entries)
        rest, tail = (buffers[:-sent], buffers[-sent:]) if sent else (buffers, [])
        scattered.TABLE.clear()
        pos = 0
        for blob_id, n in entries:
            new = scattered.note_use(self.scattered, blob_id)  # the provider's mirror rule
            if n:
                _, parts = decode_frame(tail[pos])
                parts = [parts[0], *(_own_copy(b) for b in parts[1:])]
                self.scattered[blob_id] = cloudpickle.loads(parts[0], buffers=parts[1:])
                pos += n
            if new and not n:  # never sent here: left missing, resolve() says so
                del self.scattered[blob_id]
            else:
                scattered.TABLE[blob_id] = self.scattered[blob_id]
        return rest

    @staticmethod
    def _run_chunk(fn: Any, parts: list[int], payload: list[memoryview],
                   limit: int | None) -> list:
        """Run ``fn`` on each item of a chunk; the manifest, then every item's result buffers.
        Each item's failure is its own (the next item runs); output and memory caps are the
        chunk's, as they are a task's."""
        import cloudpickle
        import msgpack

        counts, failed, errors, out = [], [], [], []
        pos = 0
        for i, n in enumerate(parts):
            stream = payload[pos:pos + n]
            pos += n
            try:
                args, kwargs = cloudpickle.loads(stream[0], buffers=stream[1:])
                del stream
                item = dumps_result(fn(*args, **kwargs))
                del args, kwargs
            except BaseException as exc:  # noqa: BLE001 - an item's failure is its result
                error = describe_error(exc)
                if isinstance(exc, MemoryError):
                    error.update(type="MemoryError", module="builtins",
                                 message=memory_message(limit, error["message"]))
                counts.append(0)
                failed.append(i)
                errors.append(error)
                continue
            counts.append(len(item))
            out += item
        room = CHUNK_ERROR_CHARS // max(1, 2 * len(errors))
        for error in errors:
            error["message"] = error["message"][:room]
            error["traceback"] = error["traceback"][-room:]
        manifest = msgpack.packb({"parts": counts, "failed": failed, "errors": errors})
        return [manifest, *out]

    def _end_output(self, out: StreamToChannel, err: StreamToChannel) -> int:
        """Flush and close the task's streams (threads it left behind print nowhere)."""
        self.flusher.streams = ()
        return out.finish() + err.finish()

    def _function(self, func_hash: str, blob: memoryview | None) -> Any:
        import cloudpickle

        fn = self.funcs.get(func_hash)
        if fn is None:
            if blob is None:
                raise RuntimeError(f"function {func_hash} was not sent to this worker")
            fn = cloudpickle.loads(blob)
            self.funcs[func_hash] = fn
            if len(self.funcs) > FUNCS_KEPT:
                self.funcs.popitem(last=False)
        return fn


def preload() -> None:
    """Import what most tasks need before the first task, so a warm worker answers at once."""
    import cloudpickle  # noqa: F401

    with contextlib.suppress(ImportError):
        import numpy  # noqa: F401


def watch_parent(interval: float = 0.25) -> None:
    """End this process group if the provider dies: a task must never run on unsupervised
    (no timeout, no cancel, no metering) after its provider is gone, even by SIGKILL."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    watch_parent()
    preload()
    Worker(Channel(sock)).serve()


if __name__ == "__main__":
    main()
