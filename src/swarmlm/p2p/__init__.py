"""Peer-to-peer layer: identities, wire format, TLS transport, discovery and BFT rounds."""

from swarmlm.p2p.errors import (
    ConsensusError,
    IdentityError,
    MessageRejectedError,
    P2PError,
    TransportError,
    WireError,
)
from swarmlm.p2p.identity import (
    NodeIdentity,
    canonical_encode,
    node_id_from_public_key,
    verify_signature,
)

__all__ = [
    "ConsensusError",
    "IdentityError",
    "MessageRejectedError",
    "NodeIdentity",
    "P2PError",
    "TransportError",
    "WireError",
    "canonical_encode",
    "node_id_from_public_key",
    "verify_signature",
]
