"""Spare memory files: a blob's memfd, let go, is reused for the same account's next blob.

The attack: a task keeps a reference to its argument (a global), so its process still maps the
memory file the provider will write the next blob into. The same account's next blob must not
change what it kept (the worker made that mapping private before answering), and a task that
defeats that step must still never see another account's bytes (a spare serves one account).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import start_gateway

from gateway.blob_messages import BLOB_MIN
from notebook_ext import Client
from provider.shared_memory import Builder
from provider.spares import Spares
from provider.store import ResultStore

MiB = 1024 * 1024
SIZE = 2 * BLOB_MIN  # an argument this big travels as a blob, into a memory file


# --------------------------------------------------------------------------- in one process

def built(spares: Spares, owner: str, size: int = 4 * MiB, fill: int = 1):
    """A finished blob of ``owner`` holding ``fill`` bytes, and its descriptor's inode."""
    b = Builder(size, spares, owner)
    b.write(0, memoryview(bytes([fill]) * size))
    buf = b.finish()
    return buf, os.fstat(buf.fd).st_ino


def test_a_spare_serves_only_the_account_whose_blob_it_held() -> None:
    spares = Spares(limit=64 * MiB)
    buf, inode = built(spares, "alice")
    del buf  # let go: the memory file becomes alice's spare
    assert spares.nbytes == 4 * MiB

    bob, bob_inode = built(spares, "bob", fill=2)
    assert bob_inode != inode and spares.nbytes == 4 * MiB  # bob gets a file of his own

    again, again_inode = built(spares, "alice", fill=3)
    assert again_inode == inode and spares.nbytes == 0 and spares.reused == 1
    assert bytes(again[:4]) == b"\x03" * 4 and bytes(again[-4:]) == b"\x03" * 4
    assert bytes(bob[:4]) == b"\x02" * 4
    del again, bob
    spares.close()
    assert spares.nbytes == 0


def test_a_spare_serves_only_a_blob_of_its_size() -> None:
    spares = Spares(limit=64 * MiB)
    buf, inode = built(spares, "alice", size=8 * MiB)
    del buf
    small, small_inode = built(spares, "alice", size=4 * MiB)
    assert small_inode != inode and spares.nbytes == 8 * MiB
    same, same_inode = built(spares, "alice", size=8 * MiB)
    assert same_inode == inode and len(same) == 8 * MiB
    del small, same
    spares.close()


def test_a_blob_file_cannot_be_shrunk_or_written_but_by_its_builder() -> None:
    """What keeps a task that kept the descriptor from killing the provider (SIGBUS on a
    shrunk file under its mappings) or changing the stored bytes."""
    spares = Spares(limit=64 * MiB)
    buf, _ = built(spares, "alice", fill=7)
    fd = buf.fd
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.pwrite(fd, b"x", 0),
                        lambda: os.pwrite(reopened, b"x", 0), lambda: mmap.mmap(fd, 4096)):
            with pytest.raises(PermissionError):
                attempt()
    finally:
        os.close(reopened)
    assert bytes(buf[:4]) == b"\x07" * 4
    del buf
    again, _ = built(spares, "alice", fill=8)  # the provider itself still writes a spare
    assert bytes(again[:4]) == b"\x08" * 4 and spares.reused == 1
    del again
    spares.close()


def test_spares_stay_within_their_limit_and_their_time() -> None:
    spares = Spares(limit=10 * MiB, ttl=60)
    bufs = [built(spares, f"account-{i}")[0] for i in range(4)]
    del bufs
    assert spares.nbytes == 16 * MiB  # given back from finalizers: trimmed at the next shed
    spares.shed_to(spares.limit)  # (the store's make_room and every heartbeat shed)
    assert spares.nbytes == 8 * MiB  # the oldest two of four 4 MiB files were closed
    spares.ttl = -1.0  # every spare is now past its time
    spares.shed_to(spares.limit)
    assert spares.nbytes == 0
    last, inode = built(spares, "alice")
    spares.close()  # the provider stops: a blob let go afterwards is closed at once
    del last
    assert spares.nbytes == 0 and inode not in open_inodes()


def open_inodes() -> set[int]:
    """The inodes of this process's open descriptors."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            inodes.add(os.stat(f"/proc/self/fd/{name}").st_ino)
    return inodes


def test_the_store_gives_up_spares_before_its_entries() -> None:
    spares = Spares(limit=8 * MiB)
    store = ResultStore(limit=12 * MiB, spares=spares)
    store.put("alice/kept", [b"x" * (4 * MiB)])
    bufs = [built(spares, "bob")[0] for _ in range(2)]
    del bufs
    assert spares.nbytes == 8 * MiB
    store.make_room(6 * MiB)
    assert "alice/kept" in store and spares.nbytes == 0  # the spares made the room
    assert store.nbytes + spares.nbytes + 6 * MiB <= store.limit


# --------------------------------------------------------------------------- real processes

def inode_of(a) -> int:
    """The inode of the file the array's bytes are mapped from (0: anonymous memory)."""
    address = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return int(fields[4])
    raise AssertionError("the array is in no mapping")


def keep(a) -> int:
    """Keep the argument in a global: its process then still maps the blob's memory file."""
    import builtins

    builtins.kept_by_test = a
    return inode_of(a)


def worker_module():
    """The running worker's own module (``python -m provider.worker``: ``__main__``)."""
    import sys

    module = sys.modules["__main__"]
    assert hasattr(module, "let_go") and hasattr(module, "map_received"), module
    return module


def keep_defeating_let_go(a):
    """The same, after disabling the worker's step that unmaps or privatizes what a task kept."""
    worker_module().let_go = lambda maps: 0
    return keep(a)


def kept_sum() -> float:
    import builtins

    return float(builtins.kept_by_test.sum())


def sum_and_inode(a) -> tuple[float, int]:
    return float(a.sum()), inode_of(a)


@pytest.fixture(scope="module")
def account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Client]]:
    """One provider (every task lands on it); ``account(name)`` is a client of that account.
    Each test uses accounts of its own: what one test's tasks did to their worker (they patch
    it) never reaches another's."""
    tmp = tmp_path_factory.mktemp("spares")
    gw = start_gateway(tmp, local_providers=1)
    with contextlib.ExitStack() as clients:
        def account(name: str) -> Client:
            return clients.enter_context(Client(gw.url, home=tmp / name, stream_output=False))

        try:
            yield account
        finally:
            clients.close()
            gw.stop()


def kept_then_sent(keeper: Client, keep_fn, sender: Client) -> tuple[int, list[int]]:
    """``keeper`` keeps an array with ``keep_fn``, then ``sender`` sends two of the same size
    (the provider may still be letting the kept one's file go when the first arrives; by the
    second it has, and spares are taken oldest first); checks that each task saw its own bytes
    and the kept array is unchanged. Returns the inodes of the kept and the sent arrays' files."""
    kept = np.full(SIZE // 8, 1.0)
    inode = keeper.submit(keep_fn, kept).result(timeout=60)
    assert inode, "the kept argument did not arrive in a memory file"
    sent_inodes = []
    for value in (2.0, 3.0):
        sent = np.full(SIZE // 8, value)
        total, sent_inode = sender.submit(sum_and_inode, sent).result(timeout=60)
        assert total == sent.sum()
        sent_inodes.append(sent_inode)
    assert keeper.submit(kept_sum).result(timeout=60) == kept.sum()  # still its own bytes
    return inode, sent_inodes


def test_a_kept_argument_does_not_change_when_its_memory_is_reused(account) -> None:
    alice = account("alice")
    inode, sent_inodes = kept_then_sent(alice, keep, alice)
    assert inode in sent_inodes  # a later blob went into the kept one's memory file


def test_a_task_that_defeats_let_go_never_sees_another_accounts_blob(account) -> None:
    inode, sent_inodes = kept_then_sent(account("carol"), keep_defeating_let_go, account("bob"))
    assert inode not in sent_inodes  # bob's blobs went into memory files of his own


def keep_descriptors() -> None:
    """From now on, keep a duplicate of every descriptor this worker is handed (a task can
    change the worker's own code: it runs in it)."""
    import builtins
    import os

    module = worker_module()
    original = module.map_received

    def keeping(buffers, table, fds, maps):
        builtins.kept_fds = [os.dup(fd) for fd in fds]
        return original(buffers, table, fds, maps)

    module.map_received = keeping


def tamper(a) -> dict[str, str]:
    """Try to shrink, overwrite and reopen-and-overwrite the blob file this task was handed."""
    import builtins
    import os

    (fd,) = builtins.kept_fds
    outcomes = {}
    for name, attempt in (
            ("shrink", lambda: os.ftruncate(fd, 0)),
            ("write", lambda: os.pwrite(fd, b"\0" * 4096, 0)),
            ("reopen and write", lambda: os.pwrite(os.open(f"/proc/self/fd/{fd}", os.O_RDWR),
                                                   b"\0", 0))):
        try:
            attempt()
            outcomes[name] = "done"
        except OSError as exc:
            outcomes[name] = type(exc).__name__
    return outcomes


def test_a_task_holding_its_blob_file_can_neither_shrink_nor_change_it(account) -> None:
    dave = account("dave")
    dave.submit(keep_descriptors).result(timeout=60)
    outcomes = dave.submit(tamper, np.full(SIZE // 8, 5.0)).result(timeout=60)
    assert outcomes == dict.fromkeys(("shrink", "write", "reopen and write"), "PermissionError")
    for value in (6.0, 7.0):  # into that file again, by the provider, which is still up
        after = np.full(SIZE // 8, value)
        assert dave.submit(sum_and_inode, after).result(timeout=60)[0] == after.sum()
