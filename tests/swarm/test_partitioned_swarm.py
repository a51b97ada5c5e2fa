"""Four real swarm nodes (TLS, round protocol, training) on one event loop with
``swarm.aggregation_layout: partitioned`` (issue 19): every honest peer ends each round with
the same parameters; a lying aggregator is caught by verifiers, the round it lied in is
recomputed, and it is voted out; a peer that accuses an honest aggregator pays for it."""

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

P2P = {
    "round_timeout": 2.0,
    "proposal_grace": 0.1,
    "heartbeat_interval": 0.3,
    "dead_timeout": 3.0,
    "pex_interval": 0.5,
    "reconnect_max": 0.5,
    "fetch_timeout": 3.0,
}


async def _until(cond: Any, timeout: float, what: str, tasks: list[asyncio.Task[Any]]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise AssertionError(f"a node failed while waiting for {what}") from t.exception()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _run_swarm(
    data: Path, tmp: Path, rounds: int, attacks: dict[int, str], **swarm: Any
) -> tuple[dict[int, dict[int, dict[str, Any]]], list[str], dict[int, Any]]:
    """Four peers; returns each peer's round events, the node ids and each node's result
    (or the exception it stopped with)."""
    threads = torch.get_num_threads()

    def config(i: int, boot: list[tuple[str, int]]) -> Any:
        cfg = swarm_config(
            data, tmp, rounds=rounds, inner_steps=4, data_shard=i, expect_peers=4,
            checkpoint_every=100, aggregation_layout="partitioned", partition_timeout=3.0,
            attack=attacks.get(i, "none"), **swarm,
        )  # fmt: skip
        return cfg.model_copy(update={"p2p": cfg.p2p.model_copy(update={**P2P, "bootstrap": boot})})

    async def scenario() -> tuple[dict[int, dict[int, dict[str, Any]]], list[str], dict[int, Any]]:
        events: dict[int, dict[int, dict[str, Any]]] = {i: {} for i in range(4)}
        ready: dict[int, int] = {}

        def sink(i: int) -> Any:
            def on_event(ev: dict[str, Any]) -> None:
                if ev["event"] == "ready":
                    ready[i] = ev["port"]
                elif ev["event"] == "round":
                    events[i][ev["round"]] = ev

            return on_event

        nodes = [SwarmNode(config(0, []), NodeIdentity.generate(), tmp / "p0", events=sink(0))]
        tasks = [asyncio.create_task(nodes[0].run())]
        await _until(lambda: 0 in ready, 60, "the first node", tasks)
        for i in range(1, 4):
            boot = [("127.0.0.1", ready[0])]
            node = SwarmNode(config(i, boot), NodeIdentity.generate(), tmp / f"p{i}",
                             events=sink(i))  # fmt: skip
            nodes.append(node)
            tasks.append(asyncio.create_task(node.run()))
        try:
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 180)
        finally:
            for t in tasks:
                t.cancel()
        return events, [n.identity.node_id for n in nodes], dict(enumerate(done))

    try:
        return asyncio.run(scenario())
    finally:
        torch.set_num_threads(threads)


def test_partitioned_peers_hold_identical_weights_and_send_about_two_payloads(
    prepared_data: Path, tmp_path: Path
) -> None:
    events, _, results = _run_swarm(prepared_data, tmp_path, 3, {}, partition_verifiers=1.5)
    for i, res in results.items():
        assert not isinstance(res, BaseException), f"peer {i}: {res!r}"
    for r in range(1, 4):
        assert len({events[i][r]["params_sha256"] for i in range(4)}) == 1, f"round {r}"
        # n - f = 3 entries may decide a round; every decided one is an input
        assert all(events[i][r]["accepted"] == events[i][r]["entries"] for i in range(4))
    assert events[0][3]["val_loss"] < events[0][1]["val_loss"] + 0.5
    # k = n = 4 parts a round, each aggregated once (an input of a 3-entry round takes two);
    # nobody was silent, so no part was aggregated twice
    assert sum(events[i][3]["parts_aggregated"] for i in range(4)) == 3 * 4
    assert all(events[i][3]["replacements"] == 0 for i in range(4))
    assert sum(events[i][3]["accusations"].get("aggregator_lied", 0) for i in range(4)) == 0


def test_a_lying_aggregator_is_caught_evicted_and_its_round_recomputed(
    prepared_data: Path, tmp_path: Path
) -> None:
    # peer 3 adds attack_scale to every part it aggregates; every other peer verifies
    # every part (partition_verify 1), so the lie is accused in the next contribution
    events, ids, results = _run_swarm(
        prepared_data, tmp_path, 4, {3: "lying_aggregator"}, partition_verifiers=100.0,
        attack_scale=5.0,
    )  # fmt: skip
    honest = [0, 1, 2]
    for i in honest:
        assert not isinstance(results[i], BaseException), f"peer {i}: {results[i]!r}"
    # judged in round 2 (its accusers' round-2 contributions carry the evidence)
    for i in honest:
        assert events[i][2]["accusations"].get("aggregator_lied", 0) >= 1
        assert events[i][2]["reputation"][ids[3][:12]] == 0.0
    # voted out: the membership shrinks to the three honest peers
    assert all(events[i][4]["members_next"] == 3 for i in honest)
    for r in sorted(set(events[0]) & set(events[1]) & set(events[2])):
        assert len({events[i][r]["params_sha256"] for i in honest}) == 1, f"round {r}"
    # the liar's last round is the one that removed it
    assert max(events[3]) < 4


def test_a_false_accuser_pays_and_the_accused_stays(prepared_data: Path, tmp_path: Path) -> None:
    events, ids, results = _run_swarm(
        prepared_data, tmp_path, 3, {2: "false_accuser"}, partition_verifiers=100.0
    )
    for i, res in results.items():
        assert not isinstance(res, BaseException), f"peer {i}: {res!r}"
    for i in range(4):
        verdicts = events[i][2]["accusations"]
        assert verdicts.get("false_accusation", 0) >= 1
        assert verdicts.get("aggregator_lied", 0) == 0
        assert events[i][3]["members_next"] == 4  # nobody was voted out
    rep = events[0][3]["reputation"]
    assert rep[ids[2][:12]] < 0.6  # halved per false accusation
    assert all(rep[ids[j][:12]] > 0.9 for j in (0, 1, 3))
    for r in range(1, 4):
        assert len({events[i][r]["params_sha256"] for i in range(4)}) == 1, f"round {r}"
