"""A leader that signs two proposals for one view must not strand the members it misled
(issue 17 #1): the proposal inside a valid decision certificate is authoritative."""

from __future__ import annotations

import asyncio
import os

from swarmlm.p2p.byzantine import ByzantineRoundProtocol
from swarmlm.p2p.consensus import RoundProtocol, leader_of

from .conftest import run, start_mesh, stop_all, until


def test_members_misled_by_a_split_proposal_decide_it_and_the_next_rounds() -> None:
    async def go() -> tuple[dict[int, set[tuple[bytes, ...]]], list[bool], int]:
        nodes = await start_mesh(4, proposal_grace=0.5)  # the leader waits for all 4 entries
        ids = sorted(x.node_id for x in nodes)
        leader = leader_of(ids, 1, 0)
        protos: list[RoundProtocol] = [
            ByzantineRoundProtocol(x, ids, "split_propose")
            if x.node_id == leader
            else RoundProtocol(x, ids)
            for x in nodes
        ]
        honest = [p for p in protos if p.node.node_id != leader]
        byz = next(p for p in protos if isinstance(p, ByzantineRoundProtocol))
        try:
            for r in (1, 2, 3):
                await asyncio.gather(
                    *(p.contribute(r, os.urandom(100), timeout=8) for p in protos),
                    return_exceptions=True,
                )
            await until(lambda: all(leader in p.proofs for p in honest), 5)
            hashes = {
                r: {tuple(p.decisions[r].digests) for p in honest if r in p.decisions}
                for r in (1, 2, 3)
            }
            decided = [all(r in p.decisions for r in (1, 2, 3)) for p in honest]
            return hashes, decided, byz.attack_stats["split_proposals"]
        finally:
            for p in protos:
                p.close()
            await stop_all(nodes)

    hashes, decided, splits = run(go())
    assert splits == 1
    assert decided == [True, True, True]  # every honest member decided rounds 1..3
    assert all(len(h) == 1 for h in hashes.values())  # and the same entries each round
