"""Abstain entries: how a lightweight voter takes part in a round without an update.

Kept apart from :mod:`swarmlm.swarm.contribution` so a voter never imports torch.
"""

from __future__ import annotations

import struct

ABSTAIN_MAGIC = b"SWAB"
_ABSTAIN = struct.Struct("<4sQ")


def encode_abstain(round: int, node_id: str) -> bytes:
    """A voter's entry: a lightweight node counts toward a round's quorum without an update.

    The node id makes each voter's payload (and so its digest) distinct within a round."""
    return _ABSTAIN.pack(ABSTAIN_MAGIC, round) + node_id.encode()[:128]


def is_abstain(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= _ABSTAIN.size and bytes(memoryview(data)[:4]) == ABSTAIN_MAGIC
