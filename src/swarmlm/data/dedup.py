"""Duplicate removal: exact (128-bit hash set) and near-duplicate (MinHash + LSH, numpy).

Memory grows with the number of *kept units*, not their size: 16 bytes (plus set overhead) per
unit for exact dedup; for MinHash ``num_perm * 4`` bytes of signature plus one dict entry per
band. Everything else in ``prepare`` uses fixed buffers.

MinHash (Broder 1997): a unit's text is normalised (lower case, whitespace runs collapsed to one
space) and shingled into overlapping ``shingle_bytes``-byte windows; each shingle gets a 64-bit
polynomial hash, each of ``num_perm`` universal hash functions ``(a*h + b) mod 2^64 >> 32``
keeps its minimum over the shingles. The fraction of equal signature entries estimates the
Jaccard similarity of the shingle sets. LSH splits the signature into ``bands`` bands of
``rows`` rows; units sharing a whole band are candidates, and a candidate is dropped only when
its estimated Jaccard with an earlier kept unit is >= ``threshold`` (so LSH collisions alone
never drop data).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from numpy.typing import NDArray

__all__ = ["ExactDeduplicator", "MinHashDeduplicator", "lsh_params", "minhash_signature"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_WS = re.compile(r"\s+")
_PRIME = np.uint64(1099511628211)  # FNV-64 prime, odd: makes the rolling hash a bijection per byte


class ExactDeduplicator:
    """Remembers 128-bit blake2b digests of the units it has seen."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, key: str) -> bool:
        """True when ``key`` was seen before; otherwise remembers it and returns False."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint is nearest threshold.

    A pair of Jaccard ``s`` becomes a candidate with probability ``1 - (1 - s^rows)^bands``; the
    curve's steepest point is near ``(1/bands)^(1/rows)``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"minhash threshold must be in (0, 1), got {threshold}")
    best: tuple[float, int, int] | None = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        # Aim slightly below the threshold: candidates are verified, misses are not recoverable.
        err = abs((1.0 / bands) ** (1.0 / rows) - (threshold - 0.1))
        if best is None or err < best[0]:
            best = (err, bands, rows)
    assert best is not None
    return best[1], best[2]


def _shingle_hashes(text: str, shingle_bytes: int) -> NDArray[np.uint64]:
    data = _WS.sub(" ", text.lower()).strip().encode("utf-8", "surrogatepass")
    b = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    if b.size == 0:
        return np.zeros(1, dtype=np.uint64)
    k = min(shingle_bytes, b.size)
    n = b.size - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _PRIME + b[j : j + n]
    return np.unique(h)


def minhash_signature(
    text: str,
    a: NDArray[np.uint64],
    b: NDArray[np.uint64],
    *,
    shingle_bytes: int = 5,
    block: int = 4096,
) -> NDArray[np.uint32]:
    """MinHash signature (num_perm,) uint32 of ``text`` under hash functions ``(a, b)``."""
    shingles = _shingle_hashes(text, shingle_bytes)
    sig = np.full(a.shape[0], np.iinfo(np.uint32).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, shingles.size, block):  # bounded (num_perm x block) temporaries
            s = shingles[start : start + block]
            hv = (a[:, None] * s[None, :] + b[:, None]) >> np.uint64(32)
            np.minimum(sig, hv.min(axis=1), out=sig)
    return sig.astype(np.uint32)


class MinHashDeduplicator:
    """Streaming near-duplicate filter: the first of a near-duplicate group is kept."""

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle_bytes: int = 5,
        seed: int = 0,
    ) -> None:
        if num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {num_perm}")
        self.threshold = threshold
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self.shingle_bytes = shingle_bytes
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._tables: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self._count = 0

    def is_duplicate(self, text: str) -> bool:
        """True when ``text`` is a near-duplicate of a kept unit; otherwise indexes it."""
        sig = minhash_signature(text, self._a, self._b, shingle_bytes=self.shingle_bytes)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {t[k] for t, k in zip(self._tables, keys, strict=True) if k in t}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            est = (self._sigs[idx] == sig[None, :]).mean(axis=1)
            if float(est.max()) >= self.threshold:
                return True
        if self._count == self._sigs.shape[0]:
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[self._count] = sig
        for table, key in zip(self._tables, keys, strict=True):
            table.setdefault(key, self._count)
        self._count += 1
        return False
