"""A restarted node must not look like an equivocator (issue 17 #10): with its vote log it
re-sends what it signed before the crash instead of signing something different."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.consensus import RoundProtocol, leader_of
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.votelog import VoteLog

from .conftest import FAST, run, start_mesh, start_node, stop_all, until


def _scenario(
    tmp: Path | None, rounds: tuple[int, ...], timeout: float
) -> tuple[list[dict[str, object]], bool, bool]:
    """Node V contributes A in round 1, crashes, restarts (same identity, fresh
    RoundProtocol at round 1) and contributes B != A; the others then contribute.
    Returns the honest nodes' proofs, whether rounds 1..3 decided everywhere and whether
    the restarted node's log refused/reused a slot."""

    async def go() -> tuple[list[dict[str, object]], bool, bool]:
        nodes = await start_mesh(4)
        ids = sorted(x.node_id for x in nodes)
        # V: not the first node (others bootstrap from it) and not round 1's leader
        victim = next(x for x in nodes[1:] if x.node_id != leader_of(ids, 1, 0))
        others = [x for x in nodes if x is not victim]
        log_path = tmp / "votes.log" if tmp else None
        vlog = VoteLog(log_path) if log_path else None
        honest = [RoundProtocol(x, ids) for x in others]
        vproto = RoundProtocol(victim, ids, vote_log=vlog)
        task = asyncio.ensure_future(vproto.contribute(1, b"A" * 100, timeout=30))
        await until(lambda: all(victim.node_id in p.rounds[1].contribs for p in honest), 10)
        task.cancel()
        vproto.close()
        if vlog is not None:
            vlog.close()
        await victim.stop()
        cfg = P2PConfig(**{**FAST, "bootstrap": [("127.0.0.1", nodes[0].port)]})
        again = P2PNode(victim.identity, cfg)
        await again.start()
        vlog2 = VoteLog(log_path) if log_path else None
        vproto2 = RoundProtocol(again, ids, vote_log=vlog2)
        protos = [*honest, vproto2]
        try:
            await until(lambda: len(again.connections) == 3, 10)
            for r in rounds:
                payload = {p: (b"B" * 100 if p is vproto2 else os.urandom(50)) for p in protos}
                await asyncio.gather(
                    *(p.contribute(r, payload[p], timeout=timeout) for p in protos),
                    return_exceptions=True,
                )
            decided = all(r in p.decisions for p in protos for r in rounds)
            await asyncio.sleep(0.3)  # a late proof would show up here
            return [dict(p.proofs) for p in honest], decided, vproto2.stats["votelog_reused"] > 0
        finally:
            for p in protos:
                p.close()
            if vlog2 is not None:
                vlog2.close()
            await stop_all([*others, again])

    result: tuple[list[dict[str, object]], bool, bool] = run(go())
    return result


def test_restarted_node_with_its_vote_log_is_not_an_equivocator(tmp_path: Path) -> None:
    proofs, decided, reused = _scenario(tmp_path, (1, 2, 3), 10)
    assert proofs == [{}, {}, {}]
    assert decided
    assert reused  # it re-sent its stored contribution A rather than signing B


def test_without_a_vote_log_the_same_restart_is_an_equivocation() -> None:
    proofs, _, _ = _scenario(None, (1,), 3)
    assert any(proofs)  # this is what the vote log prevents


def test_a_restarted_node_takes_back_its_prepared_lock_and_view(tmp_path: Path) -> None:
    """The PBFT argument needs a member that committed to report its prepared certificate
    in every later VIEWCHANGE; restarted from its node dir it must still hold it."""

    async def go() -> None:
        node = await start_node()
        ids = sorted([node.node_id, "a" * 64, "b" * 64, "c" * 64])
        prepared = {"proposal": {"m": b"p", "s": b"s"}, "votes": []}
        vlog = VoteLog(tmp_path / "votes.log")
        vlog.append(node.sign("prepare", {"view": 1, "h": b"h" * 32}, 1), 1)
        vlog.append(node.sign("commit", {"view": 1, "h": b"h" * 32}, 1), 1, prepared)
        vlog.append(node.sign("viewchange", {"view": 2, "prepared": prepared}, 1), 2)
        vlog.close()
        proto = RoundProtocol(node, ids, vote_log=VoteLog(tmp_path / "votes.log"))
        try:
            st = proto.rounds[1]
            assert st.prepared == prepared
            assert st.prepared_view == 1
            assert st.view == 2
        finally:
            proto.close()
            await node.stop()

    run(go())
