"""Ed25519 node identities, signatures and the canonical encoding that signatures cover.

A node's identity is one Ed25519 key pair, created on first start and stored in
``<node_dir>/identity.key`` (raw 32-byte private seed, file mode 0600, written atomically).
The node id is the full hex SHA-256 of the raw 32-byte public key, so anyone holding the
public key can check a claimed id without trusting the claimant.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from swarmlm.atomic import atomic_write_bytes
from swarmlm.p2p.errors import IdentityError

log = logging.getLogger(__name__)

KEY_FILE_NAME = "identity.key"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
SHORT_ID_LENGTH = 12


def node_id_from_public_key(public_key_bytes: bytes) -> str:
    """Return the node id (64 hex chars, SHA-256 of the raw public key) for a public key."""
    if not isinstance(public_key_bytes, bytes | bytearray) or len(public_key_bytes) != 32:
        raise IdentityError(
            f"public key must be {PUBLIC_KEY_SIZE} raw bytes, got "
            f"{type(public_key_bytes).__name__} of length {_safe_len(public_key_bytes)}"
        )
    return hashlib.sha256(bytes(public_key_bytes)).hexdigest()


def short_id(node_id: str) -> str:
    """Short readable form of a node id: its first 12 hex chars split in three groups."""
    s = node_id[:SHORT_ID_LENGTH]
    return f"{s[0:4]}-{s[4:8]}-{s[8:12]}"


def verify_signature(public_key_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` under the key.

    Never raises on malformed input (wrong key length, wrong signature length, wrong types):
    such input simply does not verify, so callers can feed it untrusted network bytes.
    """
    if not isinstance(public_key_bytes, bytes | bytearray) or len(public_key_bytes) != 32:
        return False
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_SIZE:
        return False
    if not isinstance(data, bytes | bytearray | memoryview):
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(public_key_bytes))
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def _canonicalize(obj: Any, path: str) -> Any:
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        raise IdentityError(f"integer at {path or 'top level'} does not fit 64 bits")
    if obj is None or isinstance(obj, bool | int | float | str | bytes):
        return obj
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, list | tuple):
        return [_canonicalize(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise IdentityError(f"canonical encoding needs str dict keys; {path} has key {k!r}")
        return {k: _canonicalize(obj[k], f"{path}.{k}") for k in sorted(obj)}
    raise IdentityError(
        f"canonical encoding cannot encode {type(obj).__name__} at {path or 'top level'}"
    )


_SCALARS = (bool, float, str, bytes)
_I64_MIN, _U64_END = -(2**63), 2**64


def _canonicalize_fast(obj: Any) -> Any:
    """:func:`_canonicalize` without the path strings it builds for its error messages:
    they cost half of signing a certificate of n entries (profiled, simulator n = 100).
    Raises IdentityError without detail; the caller re-runs the slow one to name the path."""
    if obj is None or isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, int):
        if not _I64_MIN <= obj < _U64_END:
            raise IdentityError
        return obj
    if isinstance(obj, list | tuple):
        return [_canonicalize_fast(v) for v in obj]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise IdentityError
        return {k: _canonicalize_fast(obj[k]) for k in sorted(obj)}
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    raise IdentityError


def canonical_encode(obj: Any) -> bytes:
    """Deterministic msgpack bytes for ``obj``, the exact bytes that signatures cover.

    Contract: dict keys must be ``str`` and are sorted; tuples encode as lists; bytes stay
    binary (``use_bin_type``); ints use the smallest msgpack width; floats are always
    float64. Two equal objects therefore encode to identical bytes on every machine.
    Raises :class:`IdentityError` naming the path of any value it cannot encode.
    """
    try:
        canon = _canonicalize_fast(obj)
    except IdentityError:
        canon = _canonicalize(obj, "")  # raises again, naming where
    out: bytes = msgpack.packb(canon, use_bin_type=True, use_single_float=False)
    return out


def _safe_len(x: object) -> int:
    try:
        return len(x)  # type: ignore[arg-type]
    except TypeError:
        return -1


def _write_private_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from its first byte, atomically."""
    atomic_write_bytes(path, data, mode=0o600)


class NodeIdentity:
    """A node's Ed25519 key pair and the ids derived from it.

    Attributes:
        node_id: full hex SHA-256 of ``public_key_bytes`` (64 chars).
        short_id: ``xxxx-xxxx-xxxx`` prefix of ``node_id`` for logs and prompts.
        public_key_bytes: raw 32-byte Ed25519 public key.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.node_id: str = node_id_from_public_key(self.public_key_bytes)
        self.short_id: str = short_id(self.node_id)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh in-memory identity (tests, simulations); nothing is written to disk."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, node_dir: Path) -> NodeIdentity:
        """Load ``node_dir/identity.key``, creating the directory and key on first start.

        The key file holds the raw 32-byte private seed, mode 0600, written atomically so a
        crash never leaves a truncated key. Raises :class:`IdentityError` naming the file
        when it exists but is not a valid key, or when it is readable by group/others.
        """
        node_dir = Path(node_dir)
        node_dir.mkdir(parents=True, exist_ok=True)
        path = node_dir / KEY_FILE_NAME
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise IdentityError(
                    f"identity key {path} has permissions {mode:o}; it must be 0600 "
                    f"(run: chmod 600 {path})"
                )
            raw = path.read_bytes()
            if len(raw) != 32:
                raise IdentityError(
                    f"identity key {path} must hold 32 raw bytes, found {len(raw)} bytes"
                )
            log.debug("loaded identity from %s", path)
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        key = Ed25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        _write_private_atomic(path, raw)
        ident = cls(key)
        log.info("created identity %s in %s", ident.short_id, path)
        return ident

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The private key object (needed to self-sign the TLS certificate)."""
        return self._private_key

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self._private_key.sign(bytes(data))

    def __repr__(self) -> str:
        return f"NodeIdentity({self.short_id})"
