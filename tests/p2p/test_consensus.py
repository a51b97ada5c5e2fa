"""The round protocol between real in-process nodes, plus its pure validation rules."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from swarmlm.p2p.certificates import members_hash
from swarmlm.p2p.consensus import RoundProtocol, _Round, leader_of, quorum
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import MessageSigner, SignedMessage
from swarmlm.p2p.transport import P2PNode
from swarmlm.p2p.wire import digest_of

from .conftest import run, start_mesh, start_node, stop_all, until

pytestmark = pytest.mark.timeout(90)


def test_quorum_tolerates_f_faults_of_3f_plus_1() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 6, 7, 10, 16)] == [1, 2, 3, 3, 4, 5, 5, 7, 11]


def test_leader_rotates_with_round_and_view() -> None:
    members = ["a", "b", "c", "d"]
    assert [leader_of(members, r, 0) for r in range(4)] == members
    assert leader_of(members, 1, 1) == "c"


async def _swarm(n: int) -> tuple[list[P2PNode], list[RoundProtocol]]:
    nodes = await start_mesh(n)
    ids = [x.node_id for x in nodes]
    return nodes, [RoundProtocol(x, ids) for x in nodes]


async def _close(nodes: list[P2PNode], protos: list[RoundProtocol]) -> None:
    for p in protos:
        p.close()
    await stop_all(nodes)


def test_every_honest_node_decides_the_same_set_and_holds_every_payload() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        try:
            for r in range(1, 4):
                payloads = [os.urandom(5000 + i) for i in range(4)]
                ds = await asyncio.gather(
                    *(
                        p.contribute(r, pl, timeout=30)
                        for p, pl in zip(protos, payloads, strict=True)
                    )
                )
                assert len({tuple(d.digests) for d in ds}) == 1
                assert len(ds[0].entries) >= quorum(4)
                for node in nodes:
                    for e in ds[0].entries:
                        assert node.blobs.get(e.digest) is not None
                got = await protos[1].fetch(ds[0].entries[0].digest)
                assert len(got) == ds[0].entries[0].size
        finally:
            await _close(nodes, protos)

    run(go())


def test_round_decides_without_a_crashed_member_and_excludes_nothing_honest() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        try:
            dead = nodes[
                (leader_of(protos[0].members(1) or [], 1, 0) == nodes[0].node_id and 0) or 0
            ]
            ids = protos[0].members(1) or []
            dead_id = leader_of(ids, 1, 0)  # the leader of round 1 crashes before it starts
            dead = next(x for x in nodes if x.node_id == dead_id)
            alive = [(x, p) for x, p in zip(nodes, protos, strict=True) if x is not dead]
            await dead.stop()
            ds = await asyncio.gather(*(p.contribute(1, os.urandom(100), 30) for _, p in alive))
            assert len({tuple(d.digests) for d in ds}) == 1
            assert ds[0].view >= 1  # a view change replaced the dead leader
            assert dead_id not in [e.peer for e in ds[0].entries]
        finally:
            await _close([x for x in nodes if x is not dead], protos)

    run(go())


def test_equivocation_proof_is_verifiable_and_specific() -> None:
    async def go() -> None:
        node = await start_node()
        try:
            proto = RoundProtocol(node, [node.node_id])
            mallory = MessageSigner(NodeIdentity.generate())
            a = mallory.sign("contrib", {"digest": b"a" * 32, "size": 1}, 5)
            b = mallory.sign("contrib", {"digest": b"b" * 32, "size": 1}, 5)
            c = mallory.sign("contrib", {"digest": b"a" * 32, "size": 1}, 6)
            v1 = mallory.sign("prepare", {"view": 0, "h": b"1" * 32}, 5)
            v2 = mallory.sign("prepare", {"view": 0, "h": b"2" * 32}, 5)
            v3 = mallory.sign("prepare", {"view": 1, "h": b"2" * 32}, 5)
            who = mallory.identity.node_id
            assert proto._verify_proof({"a": a.to_wire(), "b": b.to_wire()}) == who
            assert proto._verify_proof({"a": v1.to_wire(), "b": v2.to_wire()}) == who
            assert proto._verify_proof({"a": a.to_wire(), "b": c.to_wire()}) is None
            assert proto._verify_proof({"a": v2.to_wire(), "b": v3.to_wire()}) is None
            assert proto._verify_proof({"a": a.to_wire(), "b": a.to_wire()}) is None
            forged = {"m": b.raw, "s": bytes(64)}
            assert proto._verify_proof({"a": a.to_wire(), "b": forged}) is None
            proto.close()
        finally:
            await node.stop()

    run(go())


def test_proposal_from_a_non_leader_or_with_too_few_entries_is_rejected() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        try:
            ids = protos[0].members(1) or []
            st = protos[0].rounds[1]
            not_leader = next(x for x in nodes if x.node_id != leader_of(ids, 1, 0))
            msg = not_leader.sign(
                "propose",
                {"view": 0, "entries": [], "changes": [], "justify": [], "m": members_hash(ids)},
                1,
            )
            with pytest.raises(MessageRejectedError, match="non-leader"):
                protos[0]._check_proposal(st, msg)
            leader = next(x for x in nodes if x.node_id == leader_of(ids, 1, 0))
            contrib = leader.sign("contrib", {"digest": b"d" * 32, "size": 3}, 1)
            msg = leader.sign(
                "propose",
                {"view": 0, "entries": [[leader.node_id, contrib.to_wire()]], "changes": [],
                 "justify": [], "m": members_hash(ids)},
                1,
            )  # fmt: skip
            with pytest.raises(MessageRejectedError, match="1 entries"):
                protos[0]._check_proposal(st, msg)
        finally:
            await _close(nodes, protos)

    run(go())


def test_joining_peer_is_added_at_a_round_boundary_and_then_contributes() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        joiner = await start_node(bootstrap=[("127.0.0.1", nodes[0].port)])
        try:
            await until(lambda: len(joiner.connections) == 4, 10)
            await asyncio.gather(*(p.contribute(1, os.urandom(64), 30) for p in protos))
            members_2 = protos[0].members(2) or []
            jp = RoundProtocol(joiner, members_2, start_round=2)
            protos.append(jp)
            jp.request_join()
            # members vouch for a joiner once its link has been up dead_timeout (issue 17 #6)
            await until(lambda: all(p.join_acks(joiner.node_id) >= 3 for p in protos[:4]), 10)
            d2 = await asyncio.gather(*(p.contribute(2, os.urandom(64), 30) for p in protos))
            assert joiner.node_id in d2[0].members_next
            assert {tuple(d.digests) for d in d2} == {tuple(d2[0].digests)}
            d3 = await asyncio.gather(*(p.contribute(3, os.urandom(64), 30) for p in protos))
            assert len({tuple(d.digests) for d in d3}) == 1
            assert d3[0].members == sorted([*members_2, joiner.node_id])
            assert joiner.node_id in [e.peer for e in d3[0].entries]
        finally:
            await _close([*nodes, joiner], protos)

    run(go())


def test_a_node_whose_protocol_starts_late_catches_up_on_every_decided_round() -> None:
    """The CLI race of session 1: three members decide rounds (q = 3 of 4) before the fourth
    has set up its protocol. Messages that reached it early are kept by the transport, its
    refused payload pushes are fetched once announced, and it decides the same rounds."""

    async def go() -> None:
        nodes = await start_mesh(4)
        ids = [x.node_id for x in nodes]
        protos = [RoundProtocol(x, ids) for x in nodes[:3]]
        late: RoundProtocol | None = None
        try:
            decided = []
            for r in (1, 2):
                ds = await asyncio.gather(*(p.contribute(r, os.urandom(3000), 30) for p in protos))
                decided.append(ds[0])
            assert nodes[3].counters["unhandled_contrib"] > 0  # it really arrived too early
            late = RoundProtocol(nodes[3], ids)
            for r, want in zip((1, 2), decided, strict=True):
                got = await late.decision(r, timeout=30)
                assert got.digests == want.digests
                for e in got.entries:
                    assert nodes[3].blobs.get(e.digest) is not None
            # and it takes part in the next round with everyone
            ds = await asyncio.gather(
                *(p.contribute(3, os.urandom(100), 30) for p in [*protos, late])
            )
            assert len({tuple(d.digests) for d in ds}) == 1
            assert all(p.all_reached(2) for p in protos)
        finally:
            await _close(nodes, [*protos, *([late] if late else [])])

    run(go())


def test_a_decision_request_sent_before_the_round_decides_is_answered_when_it_does() -> None:
    async def go() -> None:
        nodes = await start_mesh(4, round_timeout=30.0)  # no timer will ask again in time
        ids = sorted(x.node_id for x in nodes[:3])
        protos = [RoundProtocol(x, ids) for x in nodes[:3]]
        observer = RoundProtocol(nodes[3], ids)  # not a member: it hears no votes
        try:
            observer._request_decided(1, None)  # before anyone contributed
            await asyncio.sleep(0.3)
            ds = await asyncio.gather(*(p.contribute(1, os.urandom(100), 30) for p in protos))
            await until(lambda: 1 in observer.decisions, 5)
            assert observer.decisions[1].digests == ds[0].digests
        finally:
            await _close(nodes, [*protos, observer])

    run(go())


def test_a_member_evicted_by_a_quorum_of_votes_leaves_the_membership() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        try:
            ids = protos[0].members(1) or []
            target = ids[0]
            ds = await asyncio.gather(*(p.contribute(1, os.urandom(100), 30) for p in protos))
            assert target in ds[0].members_next
            voters = [p for p, x in zip(protos, nodes, strict=True) if x.node_id != target]
            voters[0].vote_evict(target)  # one vote (f + 1 would not do either) is not enough
            ds = await asyncio.gather(*(p.contribute(2, os.urandom(100), 30) for p in protos))
            assert target in ds[0].members_next
            for p in voters[1:]:
                p.vote_evict(target)
            await asyncio.sleep(0.3)
            ds = await asyncio.gather(*(p.contribute(3, os.urandom(100), 30) for p in protos))
            assert all(target not in d.members_next for d in ds)
            assert all(len(d.members_next) == 3 for d in ds)
        finally:
            await _close(nodes, protos)

    run(go())


def test_a_removal_without_a_quorum_of_eviction_votes_is_refused() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        try:
            st = protos[0].rounds[1]
            target = st.members[1]
            votes = [
                protos[i].node.sign("evict", {"peer": target}, 0).to_wire()
                for i in range(4)
                if nodes[i].node_id != target
            ]
            change = {"op": "remove", "peer": target, "votes": votes[:2]}  # q = 3
            with pytest.raises(MessageRejectedError, match="few votes"):
                protos[0]._check_changes(st, [change], "leader")
            forged = [votes[0], votes[0], votes[1]]  # the same voter twice
            with pytest.raises(MessageRejectedError, match="few votes"):
                protos[0]._check_changes(st, [{**change, "votes": forged}], "leader")
            protos[0]._check_changes(st, [{**change, "votes": votes}], "leader")  # q: accepted
        finally:
            await _close(nodes, protos)

    run(go())


def _proposal_of(node: P2PNode, payload: bytes) -> tuple[bytes, SignedMessage, SignedMessage]:
    """A leader's proposal naming one contribution (from a third identity) of ``payload``."""
    contributor = MessageSigner(NodeIdentity.generate())
    digest = digest_of(payload)
    contrib = contributor.sign("contrib", {"digest": digest, "size": len(payload)}, 1)
    entries = [[contrib.sender, contrib.to_wire()]]
    return digest, node.sign("propose", {"entries": entries}, 1), contrib


@pytest.mark.parametrize(("announced", "push_lands"), [(True, True), (True, False), (False, False)])
def test_a_decision_waits_briefly_for_a_pushed_payload_before_pulling_a_second_copy(
    announced: bool, push_lands: bool
) -> None:
    """Under load the decision can overtake a contributor's push; pulling at once sent the
    payload twice. The decider gives an announced contribution's push ``proposal_grace`` to
    land, then pulls; a payload nobody announced to us (catching up from a certificate, as a
    joiner does) is pulled at once: waiting there made a joiner fall behind for good."""

    async def go() -> None:
        node = await start_node(proposal_grace=0.5)
        proto = RoundProtocol(node, [node.node_id])
        try:
            payload = os.urandom(4096)
            digest, prop, contrib = _proposal_of(node, payload)
            node.blobs.expect(digest)
            pulls: list[bytes] = []

            async def fetch(d: bytes, peers: list[str], timeout: float | None = None) -> bytes:
                pulls.append(d)
                node.blobs.put(d, payload)
                return payload

            node.fetch = fetch  # type: ignore[method-assign]
            if push_lands:
                asyncio.get_running_loop().call_later(0.1, node.blobs.put, digest, payload)
            st = _Round(1, [node.node_id])
            if announced:
                st.contribs[contrib.sender] = contrib
            t0 = time.monotonic()
            await asyncio.wait_for(proto._fetch_all(st, prop), 5)
            assert node.blobs.get(digest) == payload
            if not announced:
                assert time.monotonic() - t0 < 0.25  # no grace spent waiting for a push
            assert pulls == ([] if push_lands else [digest])
            assert proto.stats["pulls_to_decide"] == (0 if push_lands else 1)
        finally:
            proto.close()
            await node.stop()

    run(go())
