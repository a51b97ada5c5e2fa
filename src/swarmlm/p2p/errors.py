"""Exception family of :mod:`swarmlm.p2p`; every message names the peer, field or file."""

from __future__ import annotations


class P2PError(Exception):
    """Base class of every error raised by the p2p layer."""


class IdentityError(P2PError):
    """A key file, public key or value to sign is unusable."""


class WireError(P2PError):
    """A frame or message from the network is malformed, oversized or of the wrong version."""


class MessageRejectedError(P2PError):
    """A well-formed message failed validation (signature, replay, staleness, ...).

    ``reason`` is a short stable token used as the key of the drop counters.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransportError(P2PError):
    """A connection could not be made, was refused, or the peer failed authentication."""


class ConsensusError(P2PError):
    """The round protocol was misused or a round could not decide in time."""
