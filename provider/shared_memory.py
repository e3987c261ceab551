"""Big buffers handed to a task process without copying them through its socket.

A blob the provider receives is assembled in a :class:`SharedMap`: memory backed by a
``memfd``. When a task needs it, the provider passes the file descriptor over the worker's
socket (``SCM_RIGHTS``) instead of the bytes, and the worker maps it copy-on-write: the task may
write to its array, the provider's copy is never touched. 100 MiB reach the task in
microseconds instead of two kernel copies and hundreds of socket round trips.

Where ``memfd_create`` is missing, buffers are plain anonymous mappings and travel as bytes.
"""

from __future__ import annotations

import array
import fcntl
import gc
import mmap
import os
import socket
import stat
import weakref

from provider.spares import Spare, Spares

#: Buffers at least this large are handed over as descriptors.
SHARE_FROM = 1024 * 1024
#: Descriptors one frame may carry (a task's blobs and scattered values).
MAX_FDS = 64


class SharedMap(mmap.mmap):
    """A memfd-backed mapping that knows its descriptor (closed when the mapping is freed)."""

    fd: int = -1


#: ``F_SEAL_FUTURE_WRITE`` (Linux 5.1; the fcntl module of Python 3.11 lacks the name).
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: Every blob file is sealed with these once filled: see ``provider.spares``.
BLOB_SEALS = fcntl.F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE


def seal(fd: int) -> bool:
    """Seal a filled blob file with ``BLOB_SEALS``; False where the kernel lacks
    ``F_SEAL_FUTURE_WRITE`` (before Linux 5.1): then it is sealed against shrinking alone."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, BLOB_SEALS)
        return True
    except OSError:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return False


class Builder:
    """A buffer filled piece by piece, in order: a memfd written with ``pwrite`` (the kernel
    allocates its pages as it copies, ~40% cheaper than faulting in a fresh mapping), or a spare
    memfd of the same account and size written through its kept mapping (no page to allocate),
    mapped read-only once it is whole; a ``bytearray`` when small or where there is no memfd.
    With ``spares``, the memfd goes back to them once nothing here maps it any more."""

    def __init__(self, size: int, spares: Spares | None = None, owner: str = "") -> None:
        self.size = size
        self.fd = -1
        self.buf: bytearray | None = None
        self.spares, self.owner = spares, owner
        self.spare: Spare | None = None
        if size >= SHARE_FROM and hasattr(os, "memfd_create"):
            self.spare = spares.take(owner, size) if spares is not None else None
            if self.spare is not None:
                self.fd = self.spare.fd
            else:
                self.fd = os.memfd_create("decompute-blob", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(self.fd, size)
        else:
            self.buf = bytearray(size)

    def write(self, offset: int, data: memoryview) -> None:
        if self.buf is not None:
            self.buf[offset:offset + data.nbytes] = data
            return
        if self.spare is not None:
            self.spare.write(offset, data)
            return
        while data.nbytes:
            n = os.pwrite(self.fd, data, offset)
            offset, data = offset + n, data[n:]

    def finish(self) -> bytearray | SharedMap:
        """The whole buffer (the builder hands its descriptor over to it), sealed."""
        if self.buf is not None:
            return self.buf
        spare = self.spare or self._sealed()  # a spare taken was sealed when first filled
        buf = SharedMap(self.fd, self.size, prot=mmap.PROT_READ)
        buf.fd, self.fd, self.spare = self.fd, -1, None
        if spare is not None and self.spares is not None:
            weakref.finalize(buf, self.spares.give, spare)
        else:
            weakref.finalize(buf, os.close, buf.fd)
        return buf

    def _sealed(self) -> Spare | None:
        """Seal the fresh file; the spare it may become (its writer must exist before the
        seal), or None: no spares here, or an old kernel (a file others could write)."""
        writer = mmap.mmap(self.fd, self.size) if self.spares is not None else None
        if seal(self.fd) and writer is not None:
            return Spare(self.owner, self.fd, self.size, writer)
        if writer is not None:
            writer.close()
        return None

    def discard(self) -> None:
        if self.spare is not None and self.spares is not None:
            self.spares.give(self.spare)  # sealed, its writer kept: still a spare
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd, self.spare, self.buf = -1, None, None


def split_shared(parts: list) -> tuple[list, list[list[int]], list[int]]:
    """``parts`` with each large shared buffer replaced by an empty one: ``(parts, [[index,
    size], ...], fds)`` for the frame's ``fds`` field and the ``SCM_RIGHTS`` message."""
    out, table, fds = [], [], []
    for i, part in enumerate(parts):
        if isinstance(part, SharedMap) and len(part) >= SHARE_FROM and len(fds) < MAX_FDS:
            table.append([i, len(part)])
            fds.append(part.fd)
            out.append(b"")
        else:
            out.append(part)
    return out, table, fds


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds`` with a ``sendmsg``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(ancdata: list) -> list[int]:
    """Descriptors in a ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", data[: len(data) - len(data) % 4])
    return fds


def map_received(buffers: list, table: list, fds: list[int], maps: list) -> list:
    """Worker side: put each received descriptor's mapping (copy-on-write) in its place; the
    mappings are added to ``maps`` (for :func:`let_go`)."""
    if len(table) != len(fds):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"frame names {len(table)} shared buffers but {len(fds)} arrived")
    out = list(buffers)
    for (index, size), fd in zip(table, fds, strict=True):
        try:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if not _written_for_good(fd):  # a sealed result's bytes never change: keep it
                maps.append(mapped)
        finally:
            os.close(fd)
        out[index] = memoryview(mapped)
    return out


def _written_for_good(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE)
    except OSError:  # not a memory file
        return False


def let_go(maps: list) -> None:
    """Worker side, after a task and before its answer: unmap what it was handed. A mapping
    the task kept a reference to (a global, a result that is a view of its argument) cannot be
    unmapped: each of its pages is written once instead, which makes it this process's private
    copy. Either way, once the provider hears the answer it may reuse the memory file for the
    account's next blob (``provider.spares``) without this process seeing a byte of it change."""
    kept = _unmapped(maps)
    if kept:
        gc.collect()  # a reference cycle may be all that holds them
        kept = _unmapped(kept)
    maps.clear()
    for mapped in kept:
        for offset in range(0, len(mapped), mmap.PAGESIZE):
            mapped[offset] = mapped[offset]


def _unmapped(maps: list) -> list:
    """Close each mapping; return those still exported (referenced from somewhere)."""
    kept = []
    for mapped in maps:
        try:
            mapped.close()
        except BufferError:
            kept.append(mapped)
    return kept


#: What a result's descriptor must be sealed against: nobody can change or shrink what the
#: provider maps (a shrink under a mapping would fault the provider with SIGBUS).
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_copy(buffer: memoryview) -> int:
    """Worker side: a memfd holding ``buffer``, sealed read-only for good; its descriptor."""
    fd = os.memfd_create("decompute-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view, offset = memoryview(buffer).cast("B"), 0
        while offset < view.nbytes:
            offset += os.pwrite(fd, view[offset:], offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_sealed(fd: int, size: int) -> SharedMap:
    """Provider side: map a task's result descriptor, if it is what it must be (a sealed memory
    file of the size announced); raises ValueError otherwise. Takes ownership of ``fd``."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            raise ValueError(f"a descriptor of {info.st_size} bytes where {size} were announced "
                             f"(or not a memory file)")
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS != REQUIRED_SEALS:
            raise ValueError("a descriptor that is not sealed against writes and shrinking")
        buf = SharedMap(fd, size, prot=mmap.PROT_READ)
    except OSError as exc:
        os.close(fd)
        raise ValueError(f"a descriptor that cannot be mapped ({exc})") from None
    except BaseException:
        os.close(fd)
        raise
    buf.fd = fd
    weakref.finalize(buf, os.close, fd)
    return buf
