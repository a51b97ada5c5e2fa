"""The liveness benchmark's pure parts (schedule, summary, safety check) and its attackers.

The benchmark itself starts hundreds of processes; here only what decides its numbers is
checked, fast: which clean blocks an attack is compared with, how the headline is formed,
and that the standalone attackers really reach a node.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from swarmlm.p2p.byzantine import (
    ALL_KINDS,
    LIVENESS_KINDS,
    ByzantineRoundProtocol,
    abuse,
    outsider_join,
)
from swarmlm.p2p.consensus import RoundProtocol, leader_of
from swarmlm.p2p.messages import SignedMessage

from .conftest import run, start_mesh, start_node, stop_all, until

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark() -> ModuleType:
    """benchmarks/liveness.py as a module (a script importing its sibling ``_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("liveness_benchmark", BENCHMARKS / "liveness.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lv = load_benchmark()


def test_schedule_puts_a_clean_block_of_the_same_size_on_both_sides_of_every_attack() -> None:
    blocks = lv.schedule([4, 7], ["a", "b", "c"], repeats=2)
    assert len(blocks) == 2 * 2 * (2 * 3 + 1)
    assert [b.index for b in blocks] == list(range(len(blocks)))
    for i, b in enumerate(blocks):
        if b.scenario != lv.CLEAN:
            before, after = blocks[i - 1], blocks[i + 1]
            assert (before.scenario, after.scenario) == (lv.CLEAN, lv.CLEAN)
            assert before.n == after.n == b.n
    first = [b.scenario for b in blocks if b.repeat == 0 and b.n == 4 and b.scenario != lv.CLEAN]
    second = [b.scenario for b in blocks if b.repeat == 1 and b.n == 4 and b.scenario != lv.CLEAN]
    assert first == ["a", "b", "c"]
    assert second == ["c", "b", "a"]


def _block(n: int, scenario: str, rate: float, **extra: Any) -> dict[str, Any]:
    return {"n": n, "scenario": scenario, "rate_per_min": rate, "safety_violations": 0, **extra}


def test_summary_compares_each_attack_with_its_neighbouring_clean_blocks() -> None:
    results = [
        _block(4, "clean", 100.0),
        _block(4, "flood", 45.0),
        _block(4, "clean", 80.0),  # drift: the flood block is judged against 100 and 80
        _block(4, "pause", 90.0, catchup_rounds=1),
        _block(4, "clean", 100.0),
        _block(4, "abuse", 85.0, rss_growth_mb=40.0),
        _block(4, "clean", math.nan, error="RuntimeError: genesis"),  # a broken clean block
        _block(4, "restart", 90.0, false_equivocations=0),
        _block(4, "clean", 100.0),
    ]
    per_scenario, headline = lv.summarise(results, {"seconds": 1.5})
    assert math.isclose(results[1]["ratio"], 45.0 / 90.0)
    assert math.isclose(results[5]["ratio"], 0.85)  # the NaN neighbour is left out
    assert per_scenario["flood"] == {"4": 0.5}
    assert headline["worst_liveness_ratio"] == 0.5
    assert headline["worst_scenario"] == "flood n=4"
    assert headline["catchup_rounds_after_reconnect"] == 1
    assert headline["abuse_rss_growth_mb"] == 40.0
    assert headline["false_equivocations_after_restart"] == 0
    assert headline["shutdown_seconds"] == 1.5
    assert headline["safety_violations"] == 0
    assert headline["block_errors"] == 1
    assert headline["targets_met"] is False  # 0.5 < 0.8
    json.loads(json.dumps(headline))  # the last stdout line must be plain JSON


def test_a_node_that_never_catches_up_reports_null_and_misses_the_target() -> None:
    results = [
        _block(7, "clean", 100.0),
        _block(7, "pause", 95.0, catchup_rounds=None),
        _block(7, "clean", 100.0),
        _block(7, "pause", 95.0, catchup_rounds=2),
        _block(7, "clean", 100.0),
    ]
    _, headline = lv.summarise(results, None)
    assert headline["catchup_rounds_after_reconnect"] is None
    assert headline["targets_met"] is False
    good = {k: 0 for k in lv.TARGETS} | {"worst_liveness_ratio": 0.9}
    assert lv.targets_met(good) is True


def test_safety_check_counts_rounds_two_honest_nodes_decided_differently() -> None:
    a = [{"event": "decided", "round": 1, "entries": [["p", "aa"]]},
         {"event": "decided", "round": 2, "entries": [["p", "bb"]]}]  # fmt: skip
    b = [{"event": "decided", "round": 1, "entries": [["p", "aa"]]},
         {"event": "undecided", "round": 2},
         {"event": "decided", "round": 2, "entries": [["p", "cc"]]}]  # fmt: skip
    c = [{"event": "decided", "round": 3, "entries": []}]  # missing rounds are not conflicts
    assert lv.safety_violations([a, b, c]) == 1
    assert lv.safety_violations([a, a]) == 0


def test_rate_counts_decisions_received_inside_the_window() -> None:
    history = [{"event": "decided", "round": r, "rx": float(r)} for r in range(10)]
    history.append({"event": "undecided", "round": 10, "rx": 5.0})
    assert lv.rate_per_min(history, 2.0, 5.0) == 4 / 3.0 * 60


def test_liveness_kinds_are_byzantine_protocol_kinds() -> None:
    assert set(LIVENESS_KINDS) <= set(ALL_KINDS)
    assert {lv.BYZANTINE[s] for s in lv.BYZANTINE} <= set(ALL_KINDS)


def test_abuse_reaches_a_node_without_any_identity() -> None:
    async def go() -> dict[str, int]:
        node = await start_node()
        try:
            got = await abuse("127.0.0.1", node.port, idle=20, duration=1.0, concurrency=2)
            assert node.port  # still serving
            return got
        finally:
            await node.stop()

    got = run(go())
    assert got["idle_opened"] >= 20
    assert sum(got.get(k, 0) for k in ("garbage_raw", "garbage_tls", "garbage_refused")) >= 1


def test_outsider_join_requests_reach_every_member() -> None:
    async def go() -> tuple[list[str], list[set[str]]]:
        nodes = await start_mesh(2)
        seen: list[set[str]] = [set(), set()]
        for got, nd in zip(seen, nodes, strict=True):

            def on_join(msg: SignedMessage, peer: str, got: set[str] = got) -> None:
                got.add(msg.sender)

            nd.on("join", on_join)
        try:
            addrs = [("127.0.0.1", nd.port) for nd in nodes]
            ids = await outsider_join(addrs, keys=2, linger=0.5)
            await until(lambda: all(len(s) == 2 for s in seen), 5)
            return ids, seen
        finally:
            await stop_all(nodes)

    ids, seen = run(go())
    assert all(s == set(ids) for s in seen)


def _spy(handler: Any, got: list[int]) -> Any:
    """Wrap a node's proposal handler to note how many entries each round-1 proposal had."""

    def spy(msg: SignedMessage, peer: str) -> Any:
        if msg.round == 1:
            got.append(len(msg.body["entries"]))
        return handler(msg, peer)

    return spy


def test_a_split_proposing_leader_shows_f_members_a_different_proposal() -> None:
    async def go() -> tuple[dict[str, list[int]], int]:
        nodes = await start_mesh(4, proposal_grace=0.5)  # the leader waits for all 4 entries
        ids = sorted(x.node_id for x in nodes)
        leader = leader_of(ids, 1, 0)
        protos: list[RoundProtocol] = [
            ByzantineRoundProtocol(x, ids, "split_propose")
            if x.node_id == leader
            else RoundProtocol(x, ids)
            for x in nodes
        ]
        sizes: dict[str, list[int]] = {x.node_id: [] for x in nodes if x.node_id != leader}
        for x in nodes:
            if x.node_id != leader:
                x.handlers["propose"] = _spy(x.handlers["propose"], sizes[x.node_id])
        try:
            await asyncio.gather(
                *(p.contribute(1, os.urandom(100), timeout=3) for p in protos),
                return_exceptions=True,
            )
            byz = next(p for p in protos if isinstance(p, ByzantineRoundProtocol))
            return sizes, byz.attack_stats["split_proposals"]
        finally:
            for p in protos:
                p.close()
            await stop_all(nodes)

    sizes, splits = run(go())
    assert splits == 1
    firsts = sorted(s[0] for s in sizes.values() if s)
    assert firsts == [3, 4, 4]  # f = 1 member got the twin with one entry fewer
