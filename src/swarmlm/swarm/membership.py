"""Finding a running swarm, or forming the genesis membership: shared by training peers and
lightweight voters, and free of torch (a voter never loads it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from swarmlm.p2p.consensus import discover
from swarmlm.p2p.node_api import ProtocolNode
from swarmlm.swarm.errors import SwarmError

DISCOVER_SECONDS = 2.0  # how long a starting peer asks whether a swarm already runs


async def find_swarm(node: ProtocolNode, timeout: float) -> tuple[int, list[str]] | None:
    """A running swarm's (last decided round, next members), asked of the first peers we
    reach; None at a fresh start, when no peer has a round protocol yet."""
    if not node.config.bootstrap:
        return None  # we are the first peer: the others find us
    deadline = time.monotonic() + timeout
    while not node.connections:
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
    return await discover(node, min(DISCOVER_SECONDS, timeout))


async def form_genesis(
    node: ProtocolNode,
    expect: int,
    timeout: float,
    peer_filter: Callable[[str], bool] | None = None,
) -> list[str]:
    """This node and the first ``expect - 1`` connected round-capable peers (sorted ids)."""
    deadline = time.monotonic() + timeout

    def eligible() -> list[str]:
        return sorted(p for p in node.connections if peer_filter is None or peer_filter(p))

    while len(eligible()) < expect - 1:
        if time.monotonic() > deadline:
            raise SwarmError(
                f"genesis: only {len(eligible()) + 1} of swarm.expect_peers="
                f"{expect} round members connected within {timeout:.0f} s"
            )
        await asyncio.sleep(0.05)
    return sorted([node.node_id, *eligible()[: expect - 1]])
