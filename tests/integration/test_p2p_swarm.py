"""Real multi-process swarms on 127.0.0.1: agreement, Byzantine peers, crashes, partitions.

Every node is its own OS process speaking TLS to the others (see swarmlm.testing.p2p).
Timeouts are shortened (1 s round timeout) so the whole file runs in a few minutes.
"""

from __future__ import annotations

from typing import Any

import pytest

from swarmlm.p2p.byzantine import BYZANTINE_KINDS
from swarmlm.p2p.consensus import leader_of, quorum
from swarmlm.testing.p2p import NodeProcess, Swarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def decided_sets(nodes: list[NodeProcess]) -> list[dict[int, tuple[Any, ...]]]:
    return [
        {r: tuple(tuple(e) for e in ev["entries"]) for r, ev in p.decided().items()} for p in nodes
    ]


def assert_identical(nodes: list[NodeProcess], rounds: range) -> dict[int, tuple[Any, ...]]:
    sets = decided_sets(nodes)
    for r in rounds:
        got = {s.get(r) for s in sets}
        assert None not in got, f"round {r} did not decide on every honest node"
        assert len(got) == 1, f"honest nodes decided different sets in round {r}"
    return sets[0]


@pytest.mark.parametrize("n", [4, 7])
def test_peers_from_one_bootstrap_decide_identical_sets_over_50_rounds(n: int) -> None:
    with Swarm(n) as swarm:
        members = swarm.genesis()
        assert sorted(p.id for p in swarm.nodes) == members
        swarm.rounds(1, 50, deadline=150)
        swarm.wait_done(swarm.nodes, 180)
        sets = assert_identical(swarm.nodes, range(1, 51))
        for r, entries in sets.items():
            assert len(entries) >= quorum(n), f"round {r} decided only {len(entries)} entries"
            assert len({peer for peer, _ in entries}) == len(entries)
        # with everyone honest and up, nearly every contribution makes it in
        total = sum(len(e) for e in sets.values())
        assert total >= 0.9 * 50 * n


@pytest.mark.parametrize("kind", BYZANTINE_KINDS)
def test_honest_peers_agree_despite_a_byzantine_peer(kind: str) -> None:
    n, bad = 4, 2
    with Swarm(n, byzantine={bad: kind}, slow_delay=1.5) as swarm:
        swarm.genesis()
        swarm.rounds(1, 12, deadline=150)
        honest = swarm.honest
        done = swarm.wait_done(honest, 180)
        assert all(d["last"] >= 12 for d in done)
        sets = assert_identical(honest, range(1, 13))
        for entries in sets.values():
            assert len(entries) >= quorum(n) - 1  # n shrinks by one once an equivocator is out
        bad_id = swarm.nodes[bad].id
        rows = [{row["id"]: row for row in swarm.stats(p)["peers"]}.get(bad_id, {}) for p in honest]
        last = honest[0].decided()[12]
        if kind == "equivocate":
            assert bad_id not in last["members_next"], "equivocator was not excluded"
        elif kind in ("forge", "replay", "garbage"):
            assert all(row.get("score", 0) < 0 for row in rows), f"{kind} peer not scored down"
            expected = {"forge": {"forged", "wrong_sender"}, "replay": {"replayed", "wrong_sender"},
                        "garbage": {"malformed", "oversized"}}[kind]  # fmt: skip
            counted = [set(swarm.stats(p)["node"]["dropped"]) & expected for p in honest]
            assert all(counted), f"{kind} messages were not dropped and counted by reason"
        # withholding or slow peers cannot be proven faulty; the point is that rounds go on
        for p in honest:
            dropped = swarm.stats(p)["node"]["dropped"]
            assert "malformed" not in dropped or kind == "garbage"


def test_killing_the_leader_mid_round_triggers_a_view_change_and_the_round_decides() -> None:
    with Swarm(4, round_timeout=0.8) as swarm:
        members = swarm.genesis()
        swarm.rounds(1, 3, deadline=60)
        swarm.wait_done(swarm.nodes, 60)
        victim_id = leader_of(members, 4, 0)
        victim = next(p for p in swarm.nodes if p.id == victim_id)
        swarm.rounds(4, 6, deadline=90)
        victim.kill()  # leader of round 4 dies while round 4 is under way
        survivors = [p for p in swarm.nodes if p is not victim]
        swarm.wait_done(survivors, 120)
        sets = assert_identical(survivors, range(1, 10))
        assert survivors[0].decided()[4]["view"] >= 1 or victim_id not in dict(sets[4])
        assert any(survivors[0].decided()[r]["view"] >= 1 for r in range(4, 10))
        assert all(victim_id not in dict(sets[r]) for r in range(5, 10))


def test_minority_partition_decides_nothing_then_catches_up_after_healing() -> None:
    with Swarm(7, round_timeout=0.8) as swarm:
        swarm.genesis()
        swarm.rounds(1, 3, deadline=60)
        swarm.wait_done(swarm.nodes, 60)
        minority, majority = swarm.nodes[:2], swarm.nodes[2:]
        min_ids, maj_ids = [p.id for p in minority], [p.id for p in majority]
        for p in minority:
            p.send(cmd="block", peers=maj_ids)
        for p in majority:
            p.send(cmd="block", peers=min_ids)
        for p in swarm.nodes:
            p.wait("blocked", 10)
        swarm.rounds(4, 8, nodes=majority, deadline=90)
        swarm.rounds(4, 8, nodes=minority, wait=2, deadline=150)
        swarm.wait_done(majority, 120)
        assert_identical(majority, range(4, 12))
        for p in minority:
            assert 4 not in p.decided(), "a 2-of-7 minority decided a round"
            p.wait("undecided", 10)
        for p in swarm.nodes:
            p.send(cmd="unblock")
        swarm.wait_done(minority, 120)
        assert_identical(swarm.nodes, range(1, 12))
        # healed: all 7 go on together and the former minority contributes again
        swarm.rounds(12, 4, deadline=60)
        swarm.wait_done(swarm.nodes, 90)
        sets = assert_identical(swarm.nodes, range(12, 16))
        assert any(min_ids[0] in dict(sets[r]) for r in range(12, 16))
