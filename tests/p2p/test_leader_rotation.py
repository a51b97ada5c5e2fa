"""Leader rotation skips members absent from the previous decision (issue 17 #12): a crashed
member costs one view change, not one every time its turn comes."""

from __future__ import annotations

import asyncio
import os

from swarmlm.p2p.consensus import RoundProtocol, leader_of

from .conftest import run, start_mesh, stop_all, until

MEMBERS = ["a", "b", "c", "d", "e"]


def test_without_a_previous_decision_rotation_covers_all_members() -> None:
    assert [leader_of(MEMBERS, r, 0) for r in range(5)] == MEMBERS
    assert leader_of(MEMBERS, 1, 1) == "c"


def test_members_absent_from_the_previous_decision_are_skipped() -> None:
    live = {"a", "b", "d", "e"}  # c crashed: no entry in the previous round
    leaders = {leader_of(MEMBERS, r, v, live) for r in range(20) for v in range(3)}
    assert leaders == live
    # every member that contributed still leads in turn, views included
    assert [leader_of(MEMBERS, 4, v, live) for v in range(4)] == ["a", "b", "d", "e"]


def test_rotation_falls_back_to_all_members_when_none_is_live() -> None:
    assert leader_of(MEMBERS, 2, 0, set()) == leader_of(MEMBERS, 2, 0)
    assert leader_of(MEMBERS, 2, 0, {"x"}) == leader_of(MEMBERS, 2, 0)  # not a member
    assert leader_of(MEMBERS, 3, 1, set(MEMBERS)) == leader_of(MEMBERS, 3, 1)


def test_a_crashed_next_leader_costs_one_view_change() -> None:
    async def go() -> tuple[list[int], int]:
        nodes = await start_mesh(5)
        ids = sorted(x.node_id for x in nodes)
        protos = [RoundProtocol(x, ids) for x in nodes]
        try:
            for r in (1, 2):
                await asyncio.gather(*(p.contribute(r, os.urandom(64), timeout=10) for p in protos))
            d2 = protos[0].decisions[2]
            dead_id = leader_of(ids, 3, 0, {e.peer for e in d2.entries})
            dead = next(p for p in protos if p.node.node_id == dead_id)
            alive = [p for p in protos if p is not dead]
            dead.close()
            await dead.node.stop()
            await until(lambda: all(dead_id not in p.node.connections for p in alive), 10)
            rounds = range(3, 9)
            for r in rounds:
                await asyncio.gather(*(p.contribute(r, os.urandom(64), timeout=15) for p in alive))
            views = [alive[0].decisions[r].view for r in rounds]
            # the old rule (rotation over all members) would have made it lead round 8 too
            old_turns = sum(leader_of(ids, r, 0) == dead_id for r in rounds)
            return views, old_turns
        finally:
            for p in protos:
                p.close()
            await stop_all([p.node for p in protos if p.node.node_id != dead_id])

    views, old_turns = run(go())
    assert sum(1 for v in views if v > 0) == 1, views
    assert views[0] == 1  # the round it was due to lead
    assert old_turns >= 1
