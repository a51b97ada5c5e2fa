"""Merkle commitments: one 32-byte root that commits to many chunks, each checkable alone.

A peer that signs one root over the digests of a contribution's parts, or of a state
snapshot's shards, lets anyone verify a single part or shard against that signed root with
``ceil(log2 n)`` sibling hashes instead of fetching (or signing) all ``n`` digests. That is
what catch-up (fetch one shard of a snapshot from any peer and check it) and partitioned
aggregation (an aggregator proves the input it used for part ``i`` was committed) need.

The tree is RFC 6962's (Certificate Transparency), over leaf *digests* (32 bytes each,
usually ``sha256(chunk)``):

* leaf hash ``sha256(0x00 || digest)``, inner hash ``sha256(0x01 || left || right)``: the
  prefixes separate the two domains, so a 64-byte pair of child hashes can never pose as a
  leaf, nor a leaf as an inner node (the second-preimage attack on naive Merkle trees);
* a tree of ``n`` leaves splits at ``k``, the largest power of two below ``n``; built bottom
  up, that is the same as *promoting* a level's odd last node unchanged (never duplicating
  it, which would let ``[a, b, c]`` and ``[a, b, c, c]`` share a root);
* the root of the empty tree is ``sha256(b"")``; it has no proofs.

:func:`verify` follows RFC 9162 section 2.1.3.2: the proof's length is fixed by ``(index,
n_leaves)``, so a proof of the wrong length, for an index out of range, or for another root
raises a :class:`MerkleError` that says which. A root means something only with its tree
size: sign ``(root, n_leaves)`` together and verify against the size you expect. Proofs
travel as :meth:`MerkleProof.to_bytes`; :meth:`MerkleProof.from_bytes` checks every size
before trusting one, so bytes from the network either decode into a well-formed proof or
raise :class:`MalformedProofError`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DIGEST_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: Largest tree accepted from the wire: 2**32 - 1 leaves (the index and size are uint32), so
#: a proof never has more than 32 siblings.
MAX_LEAVES = 2**32 - 1
MAX_PROOF_LENGTH = 32
#: Wire format: version byte, index (uint32 BE), n_leaves (uint32 BE), sibling count (uint8),
#: then the siblings, 32 bytes each.
PROOF_VERSION = 1
_HEADER = struct.Struct(">BIIB")


class MerkleError(ValueError):
    """Base class: a Merkle proof, root or leaf that does not check out."""


class MalformedProofError(MerkleError):
    """A proof (or its encoding) that is not well formed: wrong sizes, index out of range,
    a sibling count that does not match the tree size. Nothing was hashed yet."""


class ProofMismatchError(MerkleError):
    """A well-formed proof whose path does not lead to the expected root: it is for another
    root, the leaf is not the one committed at that index, or the index is wrong."""


def chunk_digest(chunk: bytes) -> bytes:
    """The leaf digest of a chunk (``sha256(chunk)``); the tree hashes it again as a leaf."""
    return hashlib.sha256(chunk).digest()


def leaf_hash(digest: bytes) -> bytes:
    """``sha256(0x00 || digest)``: the hash of a leaf in the tree."""
    _check_digest(digest, "leaf digest")
    return hashlib.sha256(LEAF_PREFIX + digest).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``sha256(0x01 || left || right)``: the hash of an inner node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _check_digest(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != DIGEST_SIZE:
        size = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise MalformedProofError(f"{what} must be {DIGEST_SIZE} bytes, got {size}")


def proof_length(index: int, n_leaves: int) -> int:
    """How many siblings the proof of leaf ``index`` in a tree of ``n_leaves`` has.

    A level's odd last node is promoted without a sibling, so the length is not always
    ``ceil(log2 n)``: it is the number of levels at which the node on the path has one.
    """
    _check_position(index, n_leaves)
    length = 0
    i, width = index, n_leaves
    while width > 1:
        if i ^ 1 < width:
            length += 1
        i >>= 1
        width = (width + 1) >> 1
    return length


def _check_position(index: int, n_leaves: int) -> None:
    if not 1 <= n_leaves <= MAX_LEAVES:
        raise MalformedProofError(f"n_leaves={n_leaves} is outside 1..{MAX_LEAVES}")
    if not 0 <= index < n_leaves:
        raise MalformedProofError(f"index {index} is outside a tree of {n_leaves} leaves")


@dataclass(frozen=True)
class MerkleProof:
    """The inclusion proof of leaf ``index`` in a tree of ``n_leaves``: the sibling hashes
    from the leaf up to the root (RFC 6962's audit path)."""

    index: int
    n_leaves: int
    siblings: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_position(self.index, self.n_leaves)
        expected = proof_length(self.index, self.n_leaves)
        if len(self.siblings) != expected:
            raise MalformedProofError(
                f"proof for leaf {self.index} of {self.n_leaves} has {len(self.siblings)} "
                f"siblings, a proof there needs exactly {expected}"
            )
        for k, s in enumerate(self.siblings):
            _check_digest(s, f"sibling {k}")

    def to_bytes(self) -> bytes:
        """Compact wire form: 10-byte header then 32 bytes per sibling."""
        head = _HEADER.pack(PROOF_VERSION, self.index, self.n_leaves, len(self.siblings))
        return head + b"".join(self.siblings)

    @classmethod
    def from_bytes(cls, data: bytes) -> MerkleProof:
        """Decode :meth:`to_bytes` output, checking every size before using it.

        Raises :class:`MalformedProofError` for anything else (truncated, extra bytes, another
        version, an index out of range, a sibling count the tree size does not allow).
        """
        if not isinstance(data, bytes | bytearray):
            raise MalformedProofError(f"a proof must be bytes, got {type(data).__name__}")
        if len(data) < _HEADER.size:
            raise MalformedProofError(
                f"proof is {len(data)} bytes, shorter than its {_HEADER.size}-byte header"
            )
        version, index, n_leaves, count = _HEADER.unpack_from(data)
        if version != PROOF_VERSION:
            raise MalformedProofError(f"proof format version {version}, expected {PROOF_VERSION}")
        if count > MAX_PROOF_LENGTH:
            raise MalformedProofError(f"proof claims {count} siblings, at most {MAX_PROOF_LENGTH}")
        want = _HEADER.size + count * DIGEST_SIZE
        if len(data) != want:
            raise MalformedProofError(
                f"proof with {count} siblings must be {want} bytes, got {len(data)}"
            )
        body = bytes(data[_HEADER.size :])
        siblings = tuple(body[k : k + DIGEST_SIZE] for k in range(0, len(body), DIGEST_SIZE))
        return cls(index=index, n_leaves=n_leaves, siblings=siblings)


class MerkleTree:
    """A tree over ``leaves`` (32-byte digests, in order), with every level kept so that a
    proof costs ``O(log n)``. Building it hashes ``2n - 1`` times."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        for k, d in enumerate(leaves):
            _check_digest(d, f"leaf {k}")
        if len(leaves) > MAX_LEAVES:
            raise MerkleError(f"{len(leaves)} leaves, at most {MAX_LEAVES}")
        self.leaves: tuple[bytes, ...] = tuple(bytes(d) for d in leaves)
        level = [leaf_hash(d) for d in self.leaves]
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])  # promoted, as RFC 6962's power-of-two split implies
            level = nxt
            self._levels.append(level)

    @classmethod
    def of_chunks(cls, chunks: Iterable[bytes]) -> MerkleTree:
        """The tree over ``sha256`` of each chunk (a part's bytes, a snapshot shard)."""
        return cls([chunk_digest(c) for c in chunks])

    def __len__(self) -> int:
        return len(self.leaves)

    @property
    def root(self) -> bytes:
        """The 32-byte commitment (``sha256(b"")`` for no leaves, as RFC 6962 defines)."""
        if not self.leaves:
            return hashlib.sha256(b"").digest()
        return self._levels[-1][0]

    def proof(self, index: int) -> MerkleProof:
        """The inclusion proof of leaf ``index``."""
        _check_position(index, len(self.leaves))
        siblings: list[bytes] = []
        i = index
        for level in self._levels[:-1]:
            if i ^ 1 < len(level):
                siblings.append(level[i ^ 1])
            i >>= 1
        return MerkleProof(index=index, n_leaves=len(self.leaves), siblings=tuple(siblings))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root over ``leaves`` (32-byte digests)."""
    return MerkleTree(leaves).root


def root_from_proof(index: int, leaf: bytes, proof: Sequence[bytes], n_leaves: int) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` at ``index`` (RFC 9162 2.1.3.2).

    Raises :class:`MalformedProofError` when the proof cannot belong to that position (index
    out of range, wrong number of siblings, a sibling not 32 bytes).
    """
    _check_position(index, n_leaves)
    _check_digest(leaf, "leaf digest")
    expected = proof_length(index, n_leaves)
    if len(proof) != expected:
        raise MalformedProofError(
            f"proof for leaf {index} of {n_leaves} has {len(proof)} siblings, "
            f"a proof there needs exactly {expected}"
        )
    fn, sn = index, n_leaves - 1
    r = leaf_hash(leaf)
    for k, p in enumerate(proof):
        _check_digest(p, f"sibling {k}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # fn == sn and even: the right edge was promoted up these levels unchanged.
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r


def verify(
    root: bytes,
    index: int,
    leaf: bytes,
    proof: Sequence[bytes] | MerkleProof,
    n_leaves: int,
) -> None:
    """Check that ``leaf`` (a 32-byte digest) is leaf ``index`` of the ``n_leaves``-leaf tree
    with root ``root``; return nothing on success.

    ``index`` and ``n_leaves`` must come from the verifier's own knowledge (the plan's part
    count, the signed snapshot header), never from the proof: the same path can prove leaf
    ``2`` of 3 and leaf ``1`` of 2 under one root. A decoded :class:`MerkleProof` is accepted
    and must name the same position.

    Raises :class:`MalformedProofError` for a proof that cannot belong to that position and
    :class:`ProofMismatchError` for one that leads to another root (another tree, another
    leaf, or another index).
    """
    _check_digest(root, "root")
    if isinstance(proof, MerkleProof):
        if (proof.index, proof.n_leaves) != (index, n_leaves):
            raise MalformedProofError(
                f"proof is for leaf {proof.index} of {proof.n_leaves}, "
                f"expected leaf {index} of {n_leaves}"
            )
        proof = proof.siblings
    got = root_from_proof(index, leaf, proof, n_leaves)
    if got != bytes(root):
        raise ProofMismatchError(
            f"proof of leaf {index} of {n_leaves} leads to root {got.hex()[:16]}..., "
            f"not the committed {bytes(root).hex()[:16]}...: another root, leaf or index"
        )


def blob_chunks(blob: bytes, chunk_size: int) -> list[bytes]:
    """``blob`` cut into ``chunk_size``-byte chunks (the last may be shorter; an empty blob
    is one empty chunk, so every blob has a tree with at least one leaf)."""
    if chunk_size < 1:
        raise MerkleError(f"chunk_size must be >= 1, got {chunk_size}")
    view = memoryview(blob)
    return [bytes(view[i : i + chunk_size]) for i in range(0, len(blob), chunk_size)] or [b""]


def commit_blob(blob: bytes, chunk_size: int) -> tuple[bytes, int]:
    """``(root, n_chunks)`` of a blob (a state snapshot): what its holder signs, so a peer
    catching up can fetch and check shards from different peers (:func:`verify_chunk`)."""
    tree = MerkleTree.of_chunks(blob_chunks(blob, chunk_size))
    return tree.root, len(tree)


def verify_chunk(
    root: bytes, index: int, chunk: bytes, proof: Sequence[bytes] | MerkleProof, n_chunks: int
) -> None:
    """Check chunk ``index`` of a blob committed as ``(root, n_chunks)``; raises a
    :class:`MerkleError` as :func:`verify` does."""
    verify(root, index, chunk_digest(chunk), proof, n_chunks)
