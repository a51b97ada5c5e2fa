"""A running swarm peer that fell far behind does not wait for payloads nobody serves."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from swarmlm.p2p.consensus import Decision, Entry
from swarmlm.swarm.node import SwarmNode, _Pending


class _NoFetch:
    """A protocol stand-in: fetching a skipped round's payloads is the bug (it waited for
    swarm.round_timeout on payloads the members had pruned)."""

    async def fetch(self, digest: bytes, timeout: float) -> bytes:
        raise AssertionError("a skipped round's payloads were fetched")


def _node(events: list[dict[str, Any]]) -> SwarmNode:
    node = SwarmNode.__new__(SwarmNode)
    node.identity = SimpleNamespace(node_id="me")  # type: ignore[assignment]
    node.proto = _NoFetch()  # type: ignore[assignment]
    node.worker = SimpleNamespace()  # type: ignore[assignment]
    node.events = events.append  # type: ignore[assignment]
    node._clock, node._wall_clock = time.monotonic, time.time  # what __init__ defaults to
    return node


def _complete(node: SwarmNode, decision: Decision) -> bool:
    async def go() -> bool:
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        fut.set_result(decision)
        return await node._complete(_Pending(decision.round, fut, b"", 0.0))  # type: ignore[arg-type]

    return asyncio.run(go())


def test_a_round_decided_from_its_certificate_alone_is_skipped_not_fetched() -> None:
    events: list[dict[str, Any]] = []
    entries = [Entry("a", b"\x01" * 32, 64)]  # pruned by the members: nobody serves it
    d = Decision(40, 0, entries, ["a", "me"], ["a", "me"], [], {}, skipped=True)
    assert _complete(_node(events), d) is True
    assert [e["event"] for e in events] == ["round_skipped"]


def test_a_skipped_round_that_removed_us_stops_the_peer() -> None:
    d = Decision(40, 0, [], ["a", "me"], ["a"], [], {}, skipped=True)
    assert _complete(_node([]), d) is False
