"""TLS 1.3 with mutual authentication bound to Ed25519 node identities.

Every node presents a certificate whose public key *is* its Ed25519 identity key, and TLS
1.3's CertificateVerify proves it holds the matching private key. The certificates are
issued by an "open CA" whose private key is derived from a public constant: anyone can
issue under it, so it provides no trust at all. It exists only because Python's ``ssl``
has no verify callback, and ``CERT_REQUIRED`` (which makes servers request client
certificates) needs a chain to some loaded anchor. The real authentication is ours: after
the handshake :func:`peer_node_id` hashes the peer certificate's Ed25519 key into a node
id, and the connection is kept only if that id is the one the peer claims (or, when
dialling a known peer, the one we expected).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from swarmlm.atomic import atomic_write_bytes
from swarmlm.p2p.errors import TransportError
from swarmlm.p2p.identity import NodeIdentity, node_id_from_public_key

_OPEN_CA_SEED = hashlib.sha256(b"swarmlm open certificate authority v1 (provides no trust)")
_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
_NOT_AFTER = dt.datetime(2120, 1, 1, tzinfo=dt.timezone.utc)
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarmlm open CA (no trust)")])


@lru_cache(maxsize=1)
def _open_ca() -> tuple[Ed25519PrivateKey, x509.Certificate]:
    key = Ed25519PrivateKey.from_private_bytes(_OPEN_CA_SEED.digest())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_CA_NAME)
        .issuer_name(_CA_NAME)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, None)
    )
    return key, cert


def open_ca_pem() -> str:
    """PEM of the open CA certificate (the only anchor loaded into our contexts)."""
    return _open_ca()[1].public_bytes(serialization.Encoding.PEM).decode()


def node_certificate(identity: NodeIdentity) -> x509.Certificate:
    """Certificate carrying ``identity``'s Ed25519 key, CN = node id, issued by the open CA."""
    ca_key, _ = _open_ca()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.node_id)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(_CA_NAME)
        .public_key(identity.private_key.public_key())
        .serial_number(int(identity.node_id[:30], 16) | 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, None)
    )


def write_tls_files(identity: NodeIdentity, tls_dir: Path) -> tuple[Path, Path]:
    """Write ``node.pem`` (cert chain) and ``key.pem`` (0600) for ``identity`` atomically."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert = node_certificate(identity).public_bytes(serialization.Encoding.PEM)
    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, key_path = tls_dir / "node.pem", tls_dir / "key.pem"
    atomic_write_bytes(cert_path, cert + open_ca_pem().encode(), mode=0o644)
    atomic_write_bytes(key_path, key, mode=0o600)
    return cert_path, key_path


def make_contexts(cert_path: Path, key_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3 only, both sides must present a certificate."""
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(cadata=open_ca_pem())
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        contexts.append(ctx)
    return contexts[0], contexts[1]


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """Node id bound to the peer's certificate key; raises TransportError if there is none."""
    if ssl_object is None:
        raise TransportError("connection is not TLS")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TransportError("peer presented no certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise TransportError(f"peer certificate unreadable: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TransportError(f"peer certificate key is {type(key).__name__}, not Ed25519")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return node_id_from_public_key(raw)
