"""gateway/merkle.py against the published RFC 6962 / Certificate Transparency vectors, then
properties of random trees: every honest proof verifies, every altered one fails.

The vectors are the 8-leaf reference tree of CT's merkle tree tests, as published in
transparency-dev/merkle (``proof/verify_test.go``, ``rfc6962/rfc6962_test.go``); its inclusion
vectors count leaves from 1, converted to our 0-based indices here.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleError,
    MerkleTree,
    ProofError,
    consistency_proof,
    hash_children,
    hash_leaf,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


LEAVES = [h(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                         "606162636465666768696a6b6c6d6e6f")]
ROOTS = [h(x) for x in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (0-based leaf index, tree size, proof)
INCLUSION = [
    (0, 1, []),
    (0, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (5, 8, [h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (1, 5, [h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
]
# (first size, second size, proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, [h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


def flipped(data: bytes, at: int = 0, bit: int = 8) -> bytes:
    return data[:at] + bytes([data[at] ^ bit]) + data[at + 1:]


# -- the published vectors --------------------------------------------------------------------

def test_hashes_match_rfc6962_vectors() -> None:
    assert h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == EMPTY_ROOT
    assert hash_leaf(b"") == h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert hash_leaf(b"L123456") == h(
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56")
    assert hash_children(b"N123", b"N456") == h(
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb")
    assert MerkleTree().root() == EMPTY_ROOT != hash_leaf(b"")


def test_roots_of_every_prefix_of_the_reference_tree() -> None:
    tree = MerkleTree(LEAVES)
    assert [tree.root(n) for n in range(1, 9)] == ROOTS
    assert MerkleTree.of_leaf_hashes([hash_leaf(x) for x in LEAVES]).root() == ROOTS[7]
    grown = MerkleTree()
    for n, leaf in enumerate(LEAVES, 1):
        grown.append(leaf)
        assert grown.root() == ROOTS[n - 1]


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_vectors_generate_and_verify(index: int, size: int, proof: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert tree.inclusion_proof(index, size) == proof
    leaf, root = hash_leaf(LEAVES[index]), ROOTS[size - 1]
    verify_inclusion(leaf, index, size, proof, root)
    for probe in _corrupt_inclusion(index, size, proof, root, leaf):
        with pytest.raises(ProofError):
            verify_inclusion(*probe)


@pytest.mark.parametrize(("first", "second", "proof"), CONSISTENCY)
def test_consistency_vectors_generate_and_verify(first: int, second: int,
                                                 proof: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert tree.consistency_proof(first, second) == proof
    root1, root2 = ROOTS[first - 1], ROOTS[second - 1]
    verify_consistency(first, second, root1, root2, proof)
    if proof:
        for probe in _corrupt_consistency(first, second, root1, root2, proof):
            with pytest.raises(ProofError):
                verify_consistency(*probe)


def _corrupt_inclusion(index: int, size: int, proof: list[bytes], root: bytes,
                       leaf: bytes) -> list[tuple]:
    """The probes of CT's verifier tests: each must fail."""
    probes = [
        (leaf, index - 1, size, proof, root), (leaf, index + 1, size, proof, root),
        (leaf, index ^ 2, size, proof, root), (leaf, index, size * 2, proof, root),
        (leaf, index, size // 2, proof, root), (hash_leaf(b"WrongLeaf"), index, size, proof, root),
        (leaf, index, size, proof, EMPTY_ROOT), (leaf, index, size, proof, SOME_HASH),
        (leaf, index, size, [*proof, root], root), (leaf, index, size, [root, *proof], root),
        (leaf, index, size, [*proof, b""], root), (b"WrongLeaf", index, size, proof, root),
    ]
    probes += [(leaf, index, size, [*proof[:i], flipped(p), *proof[i + 1:]], root)
               for i, p in enumerate(proof)]
    if proof:
        probes.append((leaf, index, size, proof[:-1], root))
    if len(proof) > 1:
        probes.append((leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root))
    return probes


def _corrupt_consistency(first: int, second: int, root1: bytes, root2: bytes,
                         proof: list[bytes]) -> list[tuple]:
    probes = [
        (first - 1, second, root1, root2, proof), (first + 1, second, root1, root2, proof),
        (first ^ 2, second, root1, root2, proof), (first, second * 2, root1, root2, proof),
        (first, second // 2, root1, root2, proof), (first, second, SOME_HASH, root2, proof),
        (first, second, root1, SOME_HASH, proof), (first, second, root2, root1, proof),
        (first, second, root1, root2, []), (first, second, root1, root2, [*proof, root1]),
        (first, second, root1, root2, [*proof, root2]),
        (first, second, root1, root2, [root1, *proof]),
        (first, second, root1, root2, [root2, *proof]),
        (first, second, root1, root2, [proof[0], *proof]),
        (first, second, root1, root2, proof[:-1]),
        (first, second, b"WrongRoot", root2, proof),
    ]
    probes += [(first, second, root1, root2, [*proof[:i], flipped(p, bit=16), *proof[i + 1:]])
               for i, p in enumerate(proof)]
    return probes


def test_degenerate_consistency_cases() -> None:
    """CT's table of sizes that are always (in)consistent, whatever the proof says."""
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, ROOTS[4], [])
    verify_consistency(3, 3, ROOTS[2], ROOTS[2], [])
    for args in [
        (1, 1, ROOTS[0], ROOTS[1], []),  # two roots for one size: a fork
        (1, 0, ROOTS[0], EMPTY_ROOT, []), (2, 1, ROOTS[1], ROOTS[0], []),  # time travel
        (1, 2, ROOTS[0], ROOTS[1], []),  # a real step needs a proof
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]), (0, 1, EMPTY_ROOT, ROOTS[0], [EMPTY_ROOT]),
        (1, 1, ROOTS[0], ROOTS[0], [EMPTY_ROOT]),  # equal roots but a proof where none belongs
        (0, 1, SOME_HASH, ROOTS[0], []),  # size 0 has exactly one root
    ]:
        with pytest.raises(ProofError):
            verify_consistency(*args)


def test_inclusion_rejects_impossible_positions() -> None:
    for index, size in [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 4)]:
        with pytest.raises(ProofError, match="not in a tree"):
            verify_inclusion(SOME_HASH, index, size, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="must be 32 bytes"):
        verify_inclusion(b"", 0, 1, [], EMPTY_ROOT)


def test_generation_refuses_what_the_tree_cannot_prove() -> None:
    tree = MerkleTree(LEAVES)
    with pytest.raises(MerkleError, match="leaf index 8 is not in a tree of 8"):
        tree.inclusion_proof(8)
    with pytest.raises(MerkleError, match="past the end"):
        tree.inclusion_proof(0, 9)
    with pytest.raises(MerkleError, match="never|back to smaller"):
        tree.consistency_proof(5, 3)
    with pytest.raises(MerkleError, match="int >= 0"):
        tree.root(-1)


# -- efficiency: the structure, not a stopwatch --------------------------------------------------

def test_appends_are_amortised_constant_and_proofs_read_log_n_nodes() -> None:
    n = 100_003
    border, stored = CompactRange(), 0
    tree = MerkleTree()
    for i in range(n):
        leaf = hash_leaf(i.to_bytes(4, "big"))
        stored += len(border.append(leaf))
        tree.append_hash(leaf)
    assert stored < 2 * n  # each append closes one leaf and, on average, under one parent
    assert border.root() == tree.root()

    reads: list[tuple[int, int]] = []

    def counting(level: int, index: int) -> bytes:
        reads.append((level, index))
        return tree.node(level, index)

    bound = 3 * math.ceil(math.log2(n)) + 2
    for index, size in [(0, n), (n - 1, n), (n // 2, n - 7), (12_345, 65_537)]:
        reads.clear()
        proof = inclusion_proof(counting, index, size)
        assert len(reads) <= bound, (index, size, len(reads))
        verify_inclusion(tree.node(0, index), index, size, proof, tree.root(size))
    for first, second in [(1, n), (n - 1, n), (65_537, n), (31_000, 99_999)]:
        reads.clear()
        proof = consistency_proof(counting, first, second)
        assert len(reads) <= bound, (first, second, len(reads))
        verify_consistency(first, second, tree.root(first), tree.root(second), proof)


def test_compact_range_reloads_from_stored_nodes() -> None:
    tree = MerkleTree(LEAVES[:7])
    border = CompactRange.load(tree.node, 7)
    assert border.root() == ROOTS[6]
    made = border.append(hash_leaf(LEAVES[7]))
    assert [(level, index) for level, index, _ in made] == [(0, 7), (1, 3), (2, 1), (3, 0)]
    assert made[-1][2] == border.root() == ROOTS[7]


# -- properties of random trees -------------------------------------------------------------------

# Distinct leaves: with two equal leaves, one proof honestly proves both positions.
entries = st.lists(st.binary(max_size=12), min_size=1, max_size=70).map(
    lambda xs: [i.to_bytes(2, "big") + x for i, x in enumerate(xs)])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(entries, st.data())
def test_every_inclusion_proof_verifies_and_any_change_fails(leaves: list[bytes],
                                                             data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    size = data.draw(st.integers(1, tree.size), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    proof, root, leaf = tree.inclusion_proof(index, size), tree.root(size), tree.node(0, index)
    verify_inclusion(leaf, index, size, proof, root)

    with pytest.raises(ProofError):
        verify_inclusion(flipped(leaf, data.draw(st.integers(0, 31))), index, size, proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, proof, flipped(root, data.draw(st.integers(0, 31))))
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        bad = [*proof[:i], flipped(proof[i], data.draw(st.integers(0, 31))), *proof[i + 1:]]
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, bad, root)
    other = data.draw(st.integers(0, size), label="wrong index")
    assume(other != index)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, other, size, proof, root)
    wrong_size = data.draw(st.integers(index + 1, tree.size), label="wrong size")
    if wrong_size != size:  # the verifier takes the root from a head signed for that size
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, wrong_size, proof, tree.root(wrong_size))


@FAST
@given(entries, st.data())
def test_every_consistency_proof_verifies_and_any_change_fails(leaves: list[bytes],
                                                               data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    second = data.draw(st.integers(0, tree.size), label="second")
    first = data.draw(st.integers(0, second), label="first")
    proof = tree.consistency_proof(first, second)
    root1, root2 = tree.root(first), tree.root(second)
    verify_consistency(first, second, root1, root2, proof)

    with pytest.raises(ProofError):
        verify_consistency(first, second, flipped(root1, data.draw(st.integers(0, 31))), root2,
                           proof)
    if first != 0:  # the empty tree is a prefix of every tree: nothing about root2 to check
        with pytest.raises(ProofError):
            verify_consistency(first, second, root1,
                               flipped(root2, data.draw(st.integers(0, 31))), proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="proof element")
        bad = [*proof[:i], flipped(proof[i], data.draw(st.integers(0, 31))), *proof[i + 1:]]
        with pytest.raises(ProofError):
            verify_consistency(first, second, root1, root2, bad)
    wrong_first = data.draw(st.integers(0, second), label="wrong first")
    # an empty proof honestly links any tree to itself, and the empty tree to any tree
    if wrong_first != first and (proof or wrong_first not in (0, second)):
        with pytest.raises(ProofError):
            verify_consistency(wrong_first, second, tree.root(wrong_first), root2, proof)
    wrong_second = data.draw(st.integers(first, tree.size), label="wrong second")
    if wrong_second != second and first != 0:
        with pytest.raises(ProofError):
            verify_consistency(first, wrong_second, root1, tree.root(wrong_second), proof)


@FAST
@given(entries)
def test_a_rewritten_history_is_never_consistent(leaves: list[bytes]) -> None:
    """A fork: same size, one leaf changed. No proof the honest tree makes links the two."""
    tree = MerkleTree(leaves)
    forked = MerkleTree([*leaves[:-1], leaves[-1] + b"!"])
    n = tree.size
    with pytest.raises(ProofError):
        verify_consistency(n, n, tree.root(), forked.root(), [])
    if n > 1:
        with pytest.raises(ProofError):
            verify_consistency(n - 1, n, tree.root(n - 1), forked.root(),
                               tree.consistency_proof(n - 1))
