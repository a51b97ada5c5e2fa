"""Fixtures that start real in-process nodes on 127.0.0.1 (one event loop per test)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import swarmlm.p2p.messages as messages_mod
from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.transport import P2PNode

FAST = dict(
    heartbeat_interval=0.1,
    dead_timeout=0.6,
    pex_interval=0.1,
    reconnect_base=0.05,
    reconnect_max=0.3,
    round_timeout=0.6,
    proposal_grace=0.05,
    fetch_timeout=2.0,
)


async def start_node(**overrides: Any) -> P2PNode:
    node = P2PNode(NodeIdentity.generate(), P2PConfig(**{**FAST, **overrides}))
    await node.start()
    return node


async def start_mesh(n: int, **overrides: Any) -> list[P2PNode]:
    """``n`` nodes that know only the first one's address, waited until fully connected."""
    first = await start_node(**overrides)
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(await start_node(bootstrap=[("127.0.0.1", first.port)], **overrides))
    await until(lambda: all(len(x.connections) == n - 1 for x in nodes), 10)
    return nodes


async def until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(0.02)


async def stop_all(nodes: list[P2PNode]) -> None:
    for n in nodes:
        await n.stop()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts Ed25519 verifications (the costly step) done through open_signed."""
    calls = [0]
    real = messages_mod.verify_signature

    def counting(pk: bytes, sig: bytes, data: bytes) -> bool:
        calls[0] += 1
        return real(pk, sig, data)

    monkeypatch.setattr(messages_mod, "verify_signature", counting)
    return calls
