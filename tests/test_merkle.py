"""Merkle commitments (swarmlm.merkle): RFC 6962 trees over leaf digests, proofs that check
one chunk against a root, and wire proofs that never crash a node when malformed."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.merkle import (
    MAX_PROOF_LENGTH,
    MalformedProofError,
    MerkleError,
    MerkleProof,
    MerkleTree,
    ProofMismatchError,
    blob_chunks,
    chunk_digest,
    commit_blob,
    leaf_hash,
    merkle_root,
    node_hash,
    proof_length,
    verify,
    verify_chunk,
)


def _rfc6962_root(hashes: list[bytes]) -> bytes:
    """MTH of RFC 6962 section 2.1 over already leaf-hashed entries, written as the RFC
    states it (split at the largest power of two below n), independently of the module."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc6962_root(hashes[:k]) + _rfc6962_root(hashes[k:])).digest()


def _rfc6962_path(m: int, hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 section 2.1.1."""
    if len(hashes) == 1:
        return []
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    if m < k:
        return [*_rfc6962_path(m, hashes[:k]), _rfc6962_root(hashes[k:])]
    return [*_rfc6962_path(m - k, hashes[k:]), _rfc6962_root(hashes[:k])]


def _digests(n: int, salt: bytes = b"") -> list[bytes]:
    return [chunk_digest(salt + i.to_bytes(4, "big")) for i in range(n)]


digest_lists = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70)


@settings(max_examples=150, deadline=None)
@given(leaves=digest_lists)
def test_root_and_every_proof_match_rfc6962_and_verify(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    hashes = [hashlib.sha256(b"\x00" + d).digest() for d in leaves]
    assert tree.root == _rfc6962_root(hashes)
    for i, d in enumerate(leaves):
        proof = tree.proof(i)
        assert list(proof.siblings) == _rfc6962_path(i, hashes)
        assert len(proof.siblings) == proof_length(i, len(leaves))
        verify(tree.root, i, d, proof.siblings, len(leaves))
        decoded = MerkleProof.from_bytes(proof.to_bytes())
        assert decoded == proof
        verify(tree.root, i, d, decoded, len(leaves))


@settings(max_examples=100, deadline=None)
@given(leaves=digest_lists, data=st.data())
def test_a_changed_leaf_sibling_or_index_is_rejected(
    leaves: list[bytes], data: st.DataObject
) -> None:
    n = len(leaves)
    tree = MerkleTree(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = tree.proof(i)
    other = data.draw(st.binary(min_size=32, max_size=32).filter(lambda b: b != leaves[i]))
    with pytest.raises(ProofMismatchError):
        verify(tree.root, i, other, proof.siblings, n)
    if proof.siblings:
        k = data.draw(st.integers(0, len(proof.siblings) - 1))
        bad = list(proof.siblings)
        bad[k] = bytes(b ^ 0xFF for b in bad[k])
        with pytest.raises(ProofMismatchError):
            verify(tree.root, i, leaves[i], bad, n)
    j = data.draw(st.integers(0, n - 1))
    if j != i and leaves[j] != leaves[i]:
        with pytest.raises(MerkleError):
            verify(tree.root, j, leaves[i], proof.siblings, n)


def test_a_proof_for_another_root_names_both_roots() -> None:
    a, b = MerkleTree(_digests(9)), MerkleTree(_digests(9, b"x"))
    with pytest.raises(ProofMismatchError, match="not the committed") as err:
        verify(b.root, 3, a.leaves[3], a.proof(3).siblings, 9)
    assert a.root.hex()[:16] in str(err.value)
    assert b.root.hex()[:16] in str(err.value)


def test_a_proof_of_the_wrong_length_or_position_is_malformed() -> None:
    tree = MerkleTree(_digests(5))
    proof = tree.proof(1)  # 3 siblings in a 5-leaf tree
    with pytest.raises(MalformedProofError, match="needs exactly 3"):
        verify(tree.root, 1, tree.leaves[1], proof.siblings[:2], 5)
    with pytest.raises(MalformedProofError, match="needs exactly 3"):
        verify(tree.root, 1, tree.leaves[1], [*proof.siblings, proof.siblings[0]], 5)
    with pytest.raises(MalformedProofError, match="outside a tree of 5"):
        verify(tree.root, 5, tree.leaves[1], proof.siblings, 5)
    with pytest.raises(MalformedProofError, match="n_leaves=0"):
        verify(tree.root, 0, tree.leaves[1], proof.siblings, 0)
    with pytest.raises(MalformedProofError, match="expected leaf 2 of 5"):
        verify(tree.root, 2, tree.leaves[1], proof, 5)
    with pytest.raises(MalformedProofError, match="root must be 32 bytes"):
        verify(tree.root[:31], 1, tree.leaves[1], proof.siblings, 5)
    with pytest.raises(MalformedProofError, match="sibling 0 must be 32 bytes"):
        verify(tree.root, 1, tree.leaves[1], [b"x", *proof.siblings[1:]], 5)


def test_the_same_path_at_another_tree_size_is_caught_only_by_the_expected_size() -> None:
    # Leaf 2 of [a, b, c] and leaf 1 of a 2-leaf tree share a path: why verify() takes the
    # tree size from the verifier, never from the proof.
    leaves = _digests(3)
    tree = MerkleTree(leaves)
    path = tree.proof(2).siblings
    verify(tree.root, 2, leaves[2], path, 3)
    verify(tree.root, 1, leaves[2], path, 2)  # same root: the size must be signed with it
    forged = MerkleProof(index=1, n_leaves=2, siblings=path)
    with pytest.raises(MalformedProofError, match="expected leaf 2 of 3"):
        verify(tree.root, 2, leaves[2], forged, 3)


def test_a_leaf_cannot_pose_as_an_inner_node() -> None:
    leaves = _digests(4)
    tree = MerkleTree(leaves)
    left = node_hash(leaf_hash(leaves[0]), leaf_hash(leaves[1]))
    right = node_hash(leaf_hash(leaves[2]), leaf_hash(leaves[3]))
    assert tree.root == node_hash(left, right)
    # A naive tree would accept "left" as leaf 0 of a 2-leaf tree with the same root.
    assert merkle_root([left, right]) != tree.root
    with pytest.raises(ProofMismatchError):
        verify(tree.root, 0, left, [right], 2)


def test_an_odd_node_is_promoted_not_duplicated() -> None:
    a, b, c = _digests(3)
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])
    assert merkle_root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))
    assert MerkleTree([]).root == hashlib.sha256(b"").digest()
    assert merkle_root([a]) == leaf_hash(a)


def test_chunks_are_committed_by_their_sha256() -> None:
    chunks = [b"shard-0", b"shard-1", b"", b"shard-3 is longer"]
    tree = MerkleTree.of_chunks(chunks)
    verify(tree.root, 2, hashlib.sha256(b"").digest(), tree.proof(2), 4)


def test_bad_leaves_are_refused_when_building() -> None:
    with pytest.raises(MalformedProofError, match="leaf 1 must be 32 bytes, got 3"):
        MerkleTree([bytes(32), b"abc"])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2 * 10 + MAX_PROOF_LENGTH * 32 + 40))
def test_arbitrary_wire_bytes_decode_or_raise_a_named_error(data: bytes) -> None:
    try:
        proof = MerkleProof.from_bytes(data)
    except MalformedProofError:
        return
    assert proof.to_bytes() == data


@settings(max_examples=200, deadline=None)
@given(leaves=digest_lists, data=st.data())
def test_a_mangled_wire_proof_is_an_error_never_a_crash(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    wire = bytearray(tree.proof(i).to_bytes())
    op = data.draw(st.sampled_from(["truncate", "extend", "flip"]))
    if op == "truncate":
        wire = wire[: data.draw(st.integers(0, len(wire) - 1))]
    elif op == "extend":
        wire += data.draw(st.binary(min_size=1, max_size=64))
    else:
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] ^= data.draw(st.integers(1, 255))
    try:
        proof = MerkleProof.from_bytes(bytes(wire))
        verify(tree.root, i, leaves[i], proof, len(leaves))
    except MerkleError:
        return
    # Only a flip that changed nothing the verifier checks could pass: there is none.
    pytest.fail(f"mangled proof ({op}) was accepted")


def test_wire_errors_say_what_is_wrong() -> None:
    good = MerkleTree(_digests(6)).proof(4).to_bytes()
    with pytest.raises(MalformedProofError, match="shorter than its 10-byte header"):
        MerkleProof.from_bytes(good[:5])
    with pytest.raises(MalformedProofError, match="format version 9"):
        MerkleProof.from_bytes(b"\x09" + good[1:])
    with pytest.raises(MalformedProofError, match=r"must be \d+ bytes, got"):
        MerkleProof.from_bytes(good + b"\x00")
    with pytest.raises(MalformedProofError, match="at most 32"):
        MerkleProof.from_bytes(good[:9] + bytes([200]))
    with pytest.raises(MalformedProofError, match="a proof must be bytes"):
        MerkleProof.from_bytes("text")  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(blob=st.binary(max_size=3000), chunk_size=st.integers(1, 700), data=st.data())
def test_one_shard_of_a_snapshot_checks_against_the_signed_root(
    blob: bytes, chunk_size: int, data: st.DataObject
) -> None:
    root, n = commit_blob(blob, chunk_size)
    chunks = blob_chunks(blob, chunk_size)
    assert b"".join(chunks) == blob
    assert len(chunks) == n
    tree = MerkleTree.of_chunks(chunks)
    i = data.draw(st.integers(0, n - 1))
    verify_chunk(root, i, chunks[i], tree.proof(i), n)
    with pytest.raises(ProofMismatchError):
        verify_chunk(root, i, chunks[i] + b"x", tree.proof(i), n)
