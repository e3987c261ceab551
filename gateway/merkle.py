"""RFC 6962 / RFC 9162 Merkle trees: the receipt log's hashing and proofs, with no I/O at all.

Owns: the hashes (leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right), the empty
tree's root = SHA-256 of nothing), the root of the first ``size`` leaves, inclusion and consistency
proofs (generation and verification), and :class:`CompactRange`, the O(log n) right border of a
growing tree that turns an append into the few new nodes to store.

Must never: touch a file, socket or clock (storage hands in a ``read(level, index)`` callable), or
accept a proof it cannot check exactly: every failure raises :class:`ProofError` saying what did
not match.

Nodes are addressed ``(level, index)``: the perfect subtree over leaves
``[index * 2**level, (index + 1) * 2**level)``; level 0 holds the leaf hashes. A tree of ``n``
leaves stores each such complete subtree once (about ``2n`` hashes); any proof for any size up to
``n`` then reads O(log n) of them, and hashes the few "ephemeral" nodes on the right border of a
smaller tree on the fly (RFC 9162 section 2.1; transparency-dev/merkle's compact ranges).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: The root of the empty tree: SHA-256 of nothing (RFC 9162 section 2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: ``read(level, index)``: the stored hash of a complete subtree (see the module docstring).
NodeReader = Callable[[int, int], bytes]


class MerkleError(ValueError):
    """A request the tree cannot answer: an index or size out of range, a malformed hash."""


class ProofError(MerkleError):
    """A proof did not verify; the message says which check failed."""


def hash_leaf(entry: bytes) -> bytes:
    """The leaf hash of ``entry``; the 0x00 prefix keeps a leaf from passing for a node."""
    return hashlib.sha256(LEAF_PREFIX + entry).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """The hash of an inner node from its two children's hashes."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``): where RFC 6962 splits."""
    return 1 << ((n - 1).bit_length() - 1)


def border(size: int) -> Iterator[tuple[int, int]]:
    """The ``(level, index)`` of the complete subtrees that tile ``[0, size)``, biggest first."""
    start = 0
    for level in reversed(range(size.bit_length())):
        if size >> level & 1:
            yield level, start >> level
            start += 1 << level


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Combine subtree hashes, left to right, into one root: the last two merge first."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = hash_children(h, acc)
    return acc


def range_root(read: NodeReader, start: int, end: int) -> bytes:
    """The root of leaves ``[start, end)``, with ``start`` a multiple of a power of two that is at
    least ``end - start`` (true of every range RFC 6962's recursion visits): O(log n) reads."""
    n = end - start
    if n <= 0:
        raise MerkleError(f"empty or reversed leaf range [{start}, {end})")
    if n & (n - 1) == 0:  # one complete subtree: the common case in every proof
        level = n.bit_length() - 1
        return read(level, start >> level)
    hashes = []
    for level in reversed(range((end - start).bit_length())):
        if (end - start) >> level & 1:
            hashes.append(read(level, start >> level))
            start += 1 << level
    return _fold(hashes)


def root(read: NodeReader, size: int) -> bytes:
    """The root of the first ``size`` leaves."""
    _check_size(size)
    return EMPTY_ROOT if size == 0 else range_root(read, 0, size)


def inclusion_proof(read: NodeReader, index: int, size: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]): sibling hashes from the leaf up to the root."""
    _check_size(size)
    if not 0 <= index < size:
        raise MerkleError(f"leaf index {index} is not in a tree of {size} leaves")
    lo, hi, siblings = 0, size, []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            siblings.append(range_root(read, lo + k, hi))
            hi = lo + k
        else:
            siblings.append(range_root(read, lo, lo + k))
            lo += k
    return siblings[::-1]


def consistency_proof(read: NodeReader, first: int, second: int) -> list[bytes]:
    """RFC 6962 PROOF(first, D[0:second]): what proves the tree of ``first`` leaves is a prefix
    of the tree of ``second``. Empty when ``first`` is 0 or equals ``second``."""
    _check_size(first)
    _check_size(second)
    if first > second:
        raise MerkleError(f"no consistency proof from size {first} back to smaller size {second}")
    if first in (0, second):
        return []
    lo, hi, m, complete, nodes = 0, second, first, True, []
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            nodes.append(range_root(read, lo + k, hi))
            hi = lo + k
        else:
            nodes.append(range_root(read, lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:  # the old tree's root is a node of the new tree: it goes first
        nodes.append(range_root(read, lo, hi))
    return nodes[::-1]


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes],
                     expected_root: bytes) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves whose root is
    ``expected_root`` (RFC 9162 section 2.1.3.2); raises :class:`ProofError` otherwise."""
    _check_hashes(proof, leaf_hash=leaf_hash, root=expected_root)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError(f"inclusion proof for leaf {index} of {size} is too long")
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hash_children(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError(f"inclusion proof for leaf {index} of {size} is too short")
    if r != expected_root:
        raise ProofError(f"inclusion proof for leaf {index} of {size} leads to root {r.hex()},"
                         f" not the expected {expected_root.hex()}")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree of ``first`` leaves (``first_root``) is a prefix of the tree of
    ``second`` leaves (``second_root``) (RFC 9162 section 2.1.4.2); raises :class:`ProofError`."""
    _check_hashes(proof, first_root=first_root, second_root=second_root)
    if not 0 <= first <= second:
        raise ProofError(f"sizes {first} -> {second}: a log never shrinks")
    if first == 0 or first == second:
        if proof:
            raise ProofError(f"consistency {first} -> {second} needs an empty proof,"
                             f" got {len(proof)} hashes")
        if first == 0 and first_root != EMPTY_ROOT:
            raise ProofError(f"root {first_root.hex()} is not the empty tree's root")
        if first == second and first_root != second_root:
            raise ProofError(f"two different roots for the same size {first}: "
                             f"{first_root.hex()} and {second_root.hex()} (a fork)")
        return
    if not proof:
        raise ProofError(f"consistency {first} -> {second} needs a non-empty proof")
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof {first} -> {second} is too long")
        if fn & 1 or fn == sn:
            fr, sr = hash_children(c, fr), hash_children(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = hash_children(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError(f"consistency proof {first} -> {second} is too short")
    if fr != first_root:
        raise ProofError(f"consistency proof {first} -> {second} rebuilds old root {fr.hex()},"
                         f" not the {first_root.hex()} it was checked against")
    if sr != second_root:
        raise ProofError(f"consistency proof {first} -> {second} rebuilds new root {sr.hex()},"
                         f" not the {second_root.hex()} it was checked against")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise MerkleError(f"a tree size is an int >= 0, not {size!r}")


def _check_hashes(proof: Sequence[bytes], **named: bytes) -> None:
    for name, value in named.items():
        if not isinstance(value, bytes) or len(value) != HASH_SIZE:
            raise ProofError(f"{name} must be {HASH_SIZE} bytes, got {value!r:.80}")
    for i, p in enumerate(proof):
        if not isinstance(p, bytes) or len(p) != HASH_SIZE:
            raise ProofError(f"proof[{i}] must be {HASH_SIZE} bytes, got {p!r:.80}")


class CompactRange:
    """The right border of a tree of ``size`` leaves: one hash per set bit of ``size``.

    Enough to compute the root and to append: each append returns the complete subtrees it
    finished (the leaf, then each parent it closed), which storage keeps for proofs. Amortised
    O(1) hashes per append, O(log n) memory.
    """

    __slots__ = ("size", "_hashes")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        _check_size(size)
        if len(hashes) != size.bit_count():
            raise MerkleError(f"a tree of {size} leaves has {size.bit_count()} border hashes,"
                              f" got {len(hashes)}")
        self.size, self._hashes = size, list(hashes)

    @classmethod
    def load(cls, read: NodeReader, size: int) -> CompactRange:
        """The border of a stored tree: O(log n) reads."""
        return cls(size, [read(level, index) for level, index in border(size)])

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf; returns the new complete subtrees as ``(level, index, hash)``."""
        index, level, h = self.size, 0, leaf_hash
        made = [(0, index, h)]
        while index & 1:
            h = hash_children(self._hashes.pop(), h)
            index, level = index >> 1, level + 1
            made.append((level, index, h))
        self._hashes.append(h)
        self.size += 1
        return made

    def root(self) -> bytes:
        return _fold(self._hashes) if self._hashes else EMPTY_ROOT


class MerkleTree:
    """An in-memory log: every complete subtree kept, so proofs for any past size are O(log n).

    The reference the SQLite log is tested against, and a verifier's scratch tree (e.g. an
    auditor rebuilding a log from its exported entries).
    """

    def __init__(self, entries: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = []
        self._border = CompactRange()
        for entry in entries:
            self.append(entry)

    @classmethod
    def of_leaf_hashes(cls, leaf_hashes: Sequence[bytes]) -> MerkleTree:
        """A tree over already-hashed leaves (e.g. level 0 of a stored log)."""
        tree = cls()
        for h in leaf_hashes:
            tree.append_hash(h)
        return tree

    @property
    def size(self) -> int:
        return self._border.size

    def append(self, entry: bytes) -> int:
        """Add ``entry`` as the next leaf; returns its index."""
        return self.append_hash(hash_leaf(entry))

    def append_hash(self, leaf_hash: bytes) -> int:
        index = self.size
        for level, _, h in self._border.append(leaf_hash):
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(h)
        return index

    def node(self, level: int, index: int) -> bytes:
        """The stored hash of complete subtree ``(level, index)``."""
        try:
            if level < 0 or index < 0:
                raise IndexError
            return self._levels[level][index]
        except IndexError:
            raise MerkleError(f"no complete subtree ({level}, {index}) in a tree of"
                              f" {self.size} leaves") from None

    def root(self, size: int | None = None) -> bytes:
        return self._border.root() if size is None else root(self.node, self._bounded(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return inclusion_proof(self.node, index, self._bounded(size))

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        return consistency_proof(self.node, first, self._bounded(second))

    def _bounded(self, size: int | None) -> int:
        if size is None:
            return self.size
        _check_size(size)
        if size > self.size:
            raise MerkleError(f"size {size} is past the end of a tree of {self.size} leaves")
        return size
