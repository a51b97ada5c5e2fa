"""A node that fell more than ``keep_rounds`` behind decides again (issue 17 #2)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from swarmlm.p2p import normal_case
from swarmlm.p2p.catchup import STATE_FILE, ResumeState, load_resume_state, save_resume_state
from swarmlm.p2p.certificates import members_hash, proposal_hash
from swarmlm.p2p.consensus import Decision, RoundProtocol, leader_of
from swarmlm.p2p.errors import ConsensusError

from .conftest import run, start_mesh, stop_all, until


async def _drive(p: RoundProtocol, stop: asyncio.Event) -> None:
    """Contribute to each next round, as a swarm member does, until ``stop``."""
    while not stop.is_set():
        with contextlib.suppress(ConsensusError, TimeoutError):
            await p.contribute(p.last_decided + 1, os.urandom(64), timeout=1.0)
        await asyncio.sleep(0.01)


def test_a_node_blocked_for_three_times_keep_rounds_decides_again_within_two_rounds() -> None:
    async def go() -> tuple[int, int, int]:
        nodes = await start_mesh(4)
        ids = sorted(x.node_id for x in nodes)
        protos = [RoundProtocol(x, ids) for x in nodes]
        lag, others = protos[0], protos[1:]
        keep = lag.cfg.keep_rounds
        for x in nodes[1:]:
            x.blocked.add(lag.node.node_id)
            lag.node.blocked.add(x.node_id)
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_drive(p, stop)) for p in protos]
        try:
            await until(lambda: min(p.last_decided for p in others) >= 3 * keep, 40)
            behind = min(p.last_decided for p in others) - lag.last_decided
            for x in nodes:
                x.blocked.clear()
            at_unblock = max(p.last_decided for p in others)
            await until(lambda: lag.last_decided >= max(p.last_decided for p in others) - 1, 20)
            extra = max(p.last_decided for p in others) - at_unblock
            # and it keeps deciding with them
            target = max(p.last_decided for p in others) + 2
            await until(lambda: lag.last_decided >= target, 20)
            # one certificate of its membership, not one per missed round (issue 17 #2)
            return behind, extra, lag.stats["catchup_jumps"]
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            for p in protos:
                p.close()
            await stop_all(nodes)

    behind, extra, jumps = run(go())
    print(f"behind {behind} rounds; others decided {extra} more rounds before it caught up")
    assert behind >= 24
    # the target (<= 2 rounds) is measured by benchmarks/liveness.py; here, under a loaded
    # CI machine, one more round of slack: never deciding again is what this test catches
    assert extra <= 3
    assert jumps >= 1


def test_a_lying_peers_fake_decision_chain_is_rejected() -> None:
    """A member that is not the leader signs its own proposal and commits for the next
    round: too few of the known members' commits, so the lagging node does not jump."""

    async def go() -> tuple[int, float]:
        nodes = await start_mesh(4)
        ids = sorted(x.node_id for x in nodes)
        protos = [RoundProtocol(x, ids) for x in nodes]
        liar = next(x for x in nodes if x.node_id != leader_of(ids, 1, 0))
        victim = next(p for p in protos if p.node is not liar)
        try:
            for r in (1, 2, 3, 40):  # 40: a later round, as a jump far ahead would be
                m = members_hash(ids)
                prop = liar.sign("propose", {"view": 0, "entries": [], "changes": [],
                                             "justify": [], "m": m}, r)  # fmt: skip
                h = proposal_hash(r, [], [], m)
                commit = liar.sign("commit", {"view": 0, "h": h}, r)
                cert = {"proposal": prop.to_wire(), "commits": [commit.to_wire()] * 3}
                liar.send(victim.node.node_id, liar.sign("decided", cert, r))
            await asyncio.sleep(0.5)
            return victim.last_decided, victim.node.scores.score(liar.node_id)
        finally:
            for p in protos:
                p.close()
            await stop_all(nodes)

    last, score = run(go())
    assert last == 0  # no fake round accepted
    assert score < 0  # and the liar was charged for it


def test_resume_state_round_trips_and_a_torn_file_is_ignored(tmp_path: Path) -> None:
    d = Decision(7, 0, [], ["a", "b"], ["a", "b", "c"], [], {"proposal": {"s": b"\x01"}})
    save_resume_state(tmp_path, d)
    # the certificate comes back with its bytes (the restarted node serves it to others)
    assert load_resume_state(tmp_path) == ResumeState(
        7, ["a", "b", "c"], {"proposal": {"s": b"\x01"}}
    )
    (tmp_path / STATE_FILE).write_text('{"last_decided": 7, "memb')
    assert load_resume_state(tmp_path) is None
    assert load_resume_state(tmp_path / "absent") is None


@pytest.mark.parametrize("with_certificate", [True, False], ids=["from-file", "from-peers"])
def test_a_restarted_node_rotates_leaders_as_its_peers_do_and_serves_its_last_round(
    with_certificate: bool,
) -> None:
    """Restarted at round r + 1 (as from p2p_round_state.json), a node must know round r's
    decision: the leader rotation of round r + 1 runs over its contributors. With the
    persisted certificate it has it at once (and answers peers asking for round r); without
    it, it asks its peers and verifies their certificate. It used to rotate over all
    members and refuse the real leaders' proposals (simulator seeds 5002 and 1492)."""

    async def go() -> tuple[frozenset[str] | None, frozenset[str], bool, int]:
        nodes = await start_mesh(4)
        ids = sorted(x.node_id for x in nodes)
        protos = [RoundProtocol(x, ids) for x in nodes]
        stop = asyncio.Event()
        # three contribute: round r's decision names three of the four, so the rotation
        # over its contributors differs from the rotation over all members
        tasks = [asyncio.ensure_future(_drive(p, stop)) for p in protos[1:]]
        restarted: RoundProtocol | None = None
        try:
            await until(lambda: min(p.last_decided for p in protos[1:]) >= 2, 20)
            stop.set()
            for t in tasks:
                t.cancel()
            old = protos[1]
            await until(lambda: old.last_decided >= 2 and old.last_decided + 1 in old.rounds, 5)
            r = old.last_decided
            d = old.decisions[r]
            expected = frozenset(e.peer for e in d.entries)
            old.close()
            restarted = RoundProtocol(
                old.node,
                d.members_next,
                start_round=r + 1,
                resume_certificate=d.certificate if with_certificate else None,
            )
            st = restarted.rounds[r + 1]
            at_start = st.live
            # a round with traffic: the others contribute again, so it asks and learns
            for p in (protos[2], protos[3]):
                tasks.append(asyncio.ensure_future(p.contribute(r + 1, os.urandom(64), 5.0)))
            await until(lambda: st.live is not None or st.decided is not None, 10)
            serves = restarted._catchup_target(r) is not None
            return at_start, expected, serves, restarted.stats["live_learnt"]
        finally:
            for t in tasks:
                t.cancel()
            for p in protos:
                p.close()
            if restarted is not None:
                restarted.close()
            await stop_all(nodes)

    at_start, expected, serves, learnt = run(go())
    assert len(expected) == 3
    if with_certificate:
        assert at_start == expected  # known before any message arrives
        assert serves  # and round r is still served to peers that missed it
    else:
        assert at_start is None
        assert learnt == 1  # asked, verified the peers' certificate, rotated as they do


@pytest.mark.parametrize("pruned", [False, True], ids=["kept", "pruned"])
def test_a_node_blocked_across_a_membership_change_verifies_it_and_decides_again(
    pruned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member leaves while the node is away: it must follow the membership change in the
    certified chain (later certificates are signed by the new membership) to decide again.
    ``pruned``: the members keep only 4 decisions (KEEP_DECISIONS, 256 in production), so
    the round of the leave and every round the node missed are long gone from their
    decisions: it catches up on the certificate of the leave (kept as an epoch end) and
    then the newest one, two exchanges however far behind (issue 17 #2, any distance)."""
    if pruned:
        monkeypatch.setattr(normal_case, "KEEP_DECISIONS", 4)

    async def go() -> tuple[int, int, list[str]]:
        nodes = await start_mesh(5)
        ids = sorted(x.node_id for x in nodes)
        protos = [RoundProtocol(x, ids) for x in nodes]
        lag, leaver = protos[0], protos[1]
        others = protos[1:]
        keep = lag.cfg.keep_rounds
        for x in nodes[1:]:
            x.blocked.add(lag.node.node_id)
            lag.node.blocked.add(x.node_id)
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_drive(p, stop)) for p in protos]
        try:
            await until(lambda: min(p.last_decided for p in others) >= 3, 20)
            leaver.request_leave()
            gone = leaver.node.node_id
            stay = protos[2:]
            await until(
                lambda: gone not in (stay[0].members(stay[0].last_decided + 1) or [gone]), 20
            )
            await until(lambda: min(p.last_decided for p in stay) >= 3 * keep, 60)
            for x in nodes:
                x.blocked.clear()
            at_unblock = max(p.last_decided for p in stay)
            t0 = asyncio.get_running_loop().time()
            await until(lambda: lag.last_decided >= max(p.last_decided for p in stay) - 1, 30)
            print(f"caught up in {asyncio.get_running_loop().time() - t0:.2f} s")
            extra = max(p.last_decided for p in stay) - at_unblock
            target = max(p.last_decided for p in stay) + 2
            await until(lambda: lag.last_decided >= target, 20)
            if pruned:
                assert min(min(p.decisions) for p in stay) > 3 * keep - 8  # really pruned
            # the leave's certificate, then the newest: not one per missed round
            assert lag.stats["catchup_jumps"] >= 2
            # (walking would take >= 3 x keep_rounds certificates; a few near the end are
            # normal under load: measured 0-6)
            assert lag.stats["caught_up_rounds"] < 2 * keep
            return extra, lag.last_decided, lag.members(lag.last_decided + 1) or []
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            for p in protos:
                p.close()
            await stop_all(nodes)

    extra, _last, members = run(go())
    print(
        f"after a leave during its absence: others decided {extra} more rounds before it caught up"
    )
    # measured 1-2 rounds (0.17-0.22 s); 3-11 (1.2-1.9 s) before a targeted ask stopped
    # throttling the broadcast one; 3 leaves room for a loaded machine
    assert extra <= 3
    assert len(members) == 4
