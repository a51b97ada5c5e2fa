"""Four real swarm nodes (TLS, round protocol, training) on one event loop: a peer that
starts from other weights resynchronises over the network; a partitioned minority stops
applying updates and, once the partition heals, catches up bit for bit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmlm.p2p.identity import NodeIdentity
from swarmlm.swarm.node import SwarmNode
from tests.swarm.conftest import swarm_config

pytestmark = pytest.mark.timeout(240)


async def _until(
    cond: Any, timeout: float, what: str, tasks: list[asyncio.Task[Any]] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for t in tasks or []:
            if t.done() and t.exception() is not None:
                raise AssertionError(f"a node failed while waiting for {what}") from t.exception()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_differing_peer_resyncs_and_partitioned_peer_catches_up_when_healed(
    prepared_data: Path, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    p2p = {
        "round_timeout": 1.0,
        "proposal_grace": 0.1,
        "heartbeat_interval": 0.3,
        "dead_timeout": 2.0,
        "pex_interval": 0.5,
        "reconnect_max": 0.5,
        "fetch_timeout": 3.0,
    }

    def config(i: int, boot: list[tuple[str, int]]) -> Any:
        cfg = swarm_config(
            prepared_data, tmp_path, rounds=9, inner_steps=6, data_shard=i, expect_peers=4,
            checkpoint_every=100,
        )  # fmt: skip
        # peer 3 starts from other weights (another seed): it must fetch the agreed state
        train = cfg.train.model_copy(update={"seed": 1 if i == 3 else 0})
        p2p_cfg = cfg.p2p.model_copy(update={**p2p, "bootstrap": boot})
        return cfg.model_copy(update={"p2p": p2p_cfg, "train": train})

    ids: list[str] = []

    async def scenario() -> tuple[dict[int, dict[int, dict[str, Any]]], int]:
        rounds: dict[int, dict[int, dict[str, Any]]] = {i: {} for i in range(4)}
        ready: dict[int, int] = {}

        def sink(i: int) -> Any:
            def on_event(ev: dict[str, Any]) -> None:
                if ev["event"] == "ready":
                    ready[i] = ev["port"]
                elif ev["event"] == "round":
                    rounds[i][ev["round"]] = ev

            return on_event

        nodes = [SwarmNode(config(0, []), NodeIdentity.generate(), tmp_path / "p0", events=sink(0))]
        tasks = [asyncio.create_task(nodes[0].run())]
        await _until(lambda: 0 in ready, 60, "the first node")
        boot = [("127.0.0.1", ready[0])]
        for i in range(1, 4):
            node = SwarmNode(config(i, boot), NodeIdentity.generate(), tmp_path / f"p{i}",
                             events=sink(i))  # fmt: skip
            nodes.append(node)
            tasks.append(asyncio.create_task(node.run()))
        try:
            await _until(lambda: all(2 in rounds[i] for i in range(4)), 120, "round 2", tasks)
            cut = nodes[3].identity.node_id
            others = [n.identity.node_id for n in nodes[:3]]
            nodes[3].node.blocked.update(others)
            for n in nodes[:3]:
                n.node.blocked.add(cut)
            frozen = max(rounds[3])
            await _until(
                lambda: all(frozen + 3 in rounds[i] for i in range(3)), 120, "majority", tasks
            )
            assert max(rounds[3]) <= frozen + 1  # the minority decides (and applies) nothing
            stuck_at = max(rounds[3])
            nodes[3].node.blocked.clear()
            for n in nodes[:3]:
                n.node.blocked.discard(cut)
            await asyncio.wait_for(asyncio.gather(*tasks), 150)
            ids.extend(n.identity.node_id for n in nodes)
            return rounds, stuck_at
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        rounds, stuck_at = asyncio.run(scenario())
    finally:
        torch.set_num_threads(threads)
    assert sorted(rounds[3]) == list(range(1, 10))
    assert rounds[3][1]["resynced"]
    assert not any(rounds[i][1]["resynced"] for i in range(3))
    assert rounds[0][1]["stale"] == [ids[3][:12]]
    for r in range(1, 10):
        assert len({rounds[i][r]["params_sha256"] for i in range(4)}) == 1, f"round {r}"
    assert any(rounds[3][r]["caught_up"] for r in range(stuck_at + 1, 10))
