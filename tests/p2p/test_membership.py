"""Admission of new members (issue 17 #6) and the configurable quorum threshold.

The swarm tests use real in-process nodes on 127.0.0.1; the rules (proof of work, policies,
the join table, the quorum arithmetic) are pure and tested without sockets.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.consensus import RoundProtocol, _Round, quorum
from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.membership import (
    AdmissionPolicy,
    JoinTable,
    check_join_change,
    leading_zero_bits,
    mint_pow,
    pow_digest,
    pow_ok,
)
from swarmlm.p2p.messages import MessageSigner, open_signed
from swarmlm.p2p.transport import P2PNode

from .conftest import run, start_mesh, start_node, stop_all, until

pytestmark = pytest.mark.timeout(90)


# -- the swarm ------------------------------------------------------------------------------
async def _swarm(n: int, **cfg: Any) -> tuple[list[P2PNode], list[RoundProtocol]]:
    nodes = await start_mesh(n, **cfg)
    ids = [x.node_id for x in nodes]
    return nodes, [RoundProtocol(x, ids) for x in nodes]


async def _close(nodes: list[P2PNode], protos: list[RoundProtocol]) -> None:
    for p in protos:
        p.close()
    await stop_all(nodes)


async def _decide(protos: list[RoundProtocol], r: int) -> list[Any]:
    """Round ``r`` on every member of it (observers wait for the decision)."""
    calls = []
    for p in protos:
        members = p.members(r) or []
        if p.node.node_id in members:
            calls.append(p.contribute(r, os.urandom(64), 30))
        else:
            calls.append(p.decision(r, 30))
    return list(await asyncio.gather(*calls))


async def _outsiders(addr: tuple[str, int], keys: int, **cfg: Any) -> list[P2PNode]:
    return [await start_node(bootstrap=[addr], **cfg) for _ in range(keys)]


def test_outsiders_that_ask_to_join_and_vanish_are_never_admitted() -> None:
    """The reported attack: 3 fresh keys connect, ask to join, leave. Before the fix the next
    proposal added all three (n = 7, q = 5) and with them gone the swarm halted."""

    async def go() -> None:
        # Members ack a joiner only once its link is join_min_connected old: 5 s keeps these
        # outsiders (gone after round 1) below that however slow round 1 is on a loaded CI
        # machine (with 1 s, a slow round 1 let them be acked while live: correct, but not
        # this attack; keys that stay live are the next test's)
        nodes, protos = await _swarm(4, join_min_connected=5.0)
        outsiders = await _outsiders(nodes[0].address, 3, join_min_connected=5.0)
        try:
            await until(lambda: all(len(o.connections) >= 4 for o in outsiders), 10)
            for o in outsiders:
                o.broadcast(o.sign("join", {"nonce": b""}))
            await until(lambda: all(len(p.join_requests) == 3 for p in protos), 5)
            await _decide(protos, 1)
            for o in outsiders:
                await o.stop()
            for r in range(2, 7):
                ds = await _decide(protos, r)
                assert len({tuple(d.digests) for d in ds}) == 1
                assert len(ds[0].members_next) == 4, f"round {r} admitted a vanished outsider"
        finally:
            await _close([*nodes, *outsiders], protos)

    run(go())


def test_keys_that_stay_live_but_never_take_part_add_at_most_one_member() -> None:
    """The stronger attacker: 3 keys stay connected long enough to be acknowledged, but never
    contribute once admitted (like leaving right after admission). A join needs an entry
    from every member, so after the first such member no other joiner gets in, and the
    swarm (n = 5, q = 4) keeps deciding."""

    async def go() -> None:
        nodes, protos = await _swarm(4)
        outsiders = await _outsiders(nodes[0].address, 3)
        try:
            await until(lambda: all(len(o.connections) >= 4 for o in outsiders), 10)
            ids = [o.node_id for o in outsiders]
            await _decide(protos, 1)
            for o in outsiders:
                o.broadcast(o.sign("join", {"nonce": b""}))
            # every member vouches for all three (their links are live): the acks are valid
            await until(lambda: all(p.join_acks(i) >= 3 for p in protos for i in ids), 10)
            for r in range(2, 10):
                for o in outsiders:
                    o.broadcast(o.sign("join", {"nonce": b""}))
                ds = await _decide(protos, r)
                assert len({tuple(d.digests) for d in ds}) == 1
                assert len(set(ds[0].members_next) & set(ids)) <= 1, f"round {r}"
            assert len(set(protos[0].members(10) or []) & set(ids)) == 1  # (one got in)
        finally:
            await _close([*nodes, *outsiders], protos)

    run(go())


def test_a_live_joiner_is_admitted_within_a_few_rounds_and_one_join_per_round() -> None:
    async def go() -> None:
        nodes, protos = await _swarm(4)
        joiners = await _outsiders(nodes[0].address, 2)
        jps: list[RoundProtocol] = []
        try:
            await until(lambda: all(len(j.connections) >= 4 for j in joiners), 10)
            await _decide(protos, 1)
            jps += [RoundProtocol(j, protos[0].members(2) or [], start_round=2) for j in joiners]
            for jp in jps:
                jp.request_join()
            # members vouch once each link has been up three heartbeats (0.3 s here)
            ids = [j.node_id for j in joiners]
            await until(lambda: all(p.join_acks(i) >= 3 for p in protos for i in ids), 10)
            everyone = [*protos, *jps]
            added: dict[str, int] = {}
            r = 2
            while len(added) < 2 and r < 12:
                ds = await _decide(everyone, r)
                assert len({tuple(d.digests) for d in ds}) == 1
                grown = set(ds[0].members_next) - set(ds[0].members)
                assert len(grown) <= 1, f"round {r} admitted {len(grown)} joiners at once"
                added.update(dict.fromkeys(grown, r))
                r += 1
            # one join a round: the first in round 2 or 3, the second a round after it
            assert set(added) == set(ids), added
            assert max(added.values()) <= 5, added
            ds = await _decide(everyone, r)  # the admitted joiners now take part
            assert set(ids) <= set(ds[0].members)
        finally:
            await _close([*nodes, *joiners], [*protos, *jps])

    run(go())


async def _rounds_until_admitted(
    deciders: list[RoundProtocol],
    joiner: str,
    refused: str,
    start: int,
    each_round: Any = None,
    seconds: float = 20.0,
) -> None:
    """Decide rounds from ``start`` until ``joiner`` is admitted (``seconds`` at most, so a
    loaded machine is given time rather than a fixed count of rounds); ``refused`` must
    never be."""
    deadline = time.monotonic() + seconds
    r = start
    while time.monotonic() < deadline:
        if each_round is not None:
            each_round()
        ds = await _decide(deciders, r)
        assert refused not in ds[0].members_next, f"round {r} admitted a refused key"
        if joiner in ds[0].members_next:
            return
        r += 1
    raise AssertionError(f"the admissible joiner was not admitted by round {r}")


def test_allowlist_admits_only_listed_keys() -> None:
    async def go() -> None:
        listed, unlisted = NodeIdentity.generate(), NodeIdentity.generate()
        cfg = {"join_policy": "allowlist", "join_allowlist": [listed.public_key_bytes.hex()]}
        nodes, protos = await _swarm(4, **cfg)
        joiners = []
        for ident in (listed, unlisted):
            j = P2PNode(ident, P2PConfig(**{**_fast(), **cfg, "bootstrap": [nodes[0].address]}))
            await j.start()
            joiners.append(j)
        jps: list[RoundProtocol] = []
        try:
            await until(lambda: all(len(j.connections) >= 4 for j in joiners), 10)
            await _decide(protos, 1)
            jps += [RoundProtocol(j, protos[0].members(2) or [], start_round=2) for j in joiners]
            for jp in jps:
                jp.request_join()  # repeated by the protocol about once a second
            # (the unlisted joiner is charged for each refused request, soon blacklisted,
            # and then cannot even follow the rounds: it is not among the deciders)
            await _rounds_until_admitted([*protos, jps[0]], listed.node_id, unlisted.node_id, 2)
            assert all(p.node.scores.score(unlisted.node_id) < 0 for p in protos)
        finally:
            await _close([*nodes, *joiners], [*protos, *jps])

    run(go())


def test_pow_refuses_a_request_without_a_valid_nonce_and_admits_one_with_it() -> None:
    async def go() -> None:
        cfg = {"join_policy": "pow", "join_pow_bits": 10}
        nodes, protos = await _swarm(4, **cfg)
        cheat, honest = await _outsiders(nodes[0].address, 2, **cfg)
        jps: list[RoundProtocol] = []
        try:
            await until(lambda: len(cheat.connections) >= 4 and len(honest.connections) >= 4, 10)
            await _decide(protos, 1)
            jp = RoundProtocol(honest, protos[0].members(2) or [], start_round=2)
            jps.append(jp)
            jp.request_join()  # mints the nonce in a thread, then asks
            pk = cheat.identity.public_key_bytes
            bad = next(n for i in range(99) if not pow_ok(pk, n := bytes([i]) * 8, 10))

            def cheat_asks() -> None:
                cheat.broadcast(cheat.sign("join", {"nonce": bad}))

            deciders = [*protos, jp]
            await _rounds_until_admitted(deciders, honest.node_id, cheat.node_id, 2, cheat_asks)
            assert all(cheat.node_id not in p.join_requests for p in protos)
            assert all(p.node.scores.score(cheat.node_id) < 0 for p in protos)
        finally:
            await _close([*nodes, cheat, honest], [*protos, *jps])

    run(go())


def _fast() -> dict[str, Any]:
    from .conftest import FAST

    return dict(FAST)


# -- proposal validation (pure) ------------------------------------------------------------
def _members(k: int) -> tuple[list[MessageSigner], list[str]]:
    signers = [MessageSigner(NodeIdentity.generate()) for _ in range(k)]
    return signers, sorted(s.identity.node_id for s in signers)


def test_join_change_needs_a_quorum_of_recent_member_acks() -> None:
    signers, members = _members(4)
    joiner = MessageSigner(NodeIdentity.generate())
    jid = joiner.identity.node_id
    req = joiner.sign("join", {"nonce": b""}).to_wire()
    policy = AdmissionPolicy("open")

    def change(acks: list[Any]) -> dict[str, Any]:
        return {"op": "join", "peer": jid, "req": req, "acks": acks}

    good = [s.sign("join_ack", {"peer": jid}, 9).to_wire() for s in signers[:3]]
    check_join_change(change(good), members, 10, 3, policy)
    bad_cases = {
        "too few": good[:2],
        "duplicate voter": [*good[:2], good[1]],
        "stale": [s.sign("join_ack", {"peer": jid}, 2).to_wire() for s in signers[:3]],
        "future": [s.sign("join_ack", {"peer": jid}, 10).to_wire() for s in signers[:3]],
        "other peer": [s.sign("join_ack", {"peer": members[0]}, 9).to_wire() for s in signers],
        "non-member": [
            *good[:2],
            MessageSigner(NodeIdentity.generate()).sign("join_ack", {"peer": jid}, 9).to_wire(),
        ],
        "padded": good * 3,
    }
    for what, acks in bad_cases.items():
        with pytest.raises(MessageRejectedError):  # noqa: PT012 (names the failing case)
            check_join_change(change(acks), members, 10, 3, policy)
            pytest.fail(f"accepted a join with acks: {what}")
    # the request must be the joiner's own, and the joiner not a member already
    with pytest.raises(MessageRejectedError):
        check_join_change({**change(good), "peer": members[0]}, members, 10, 3, policy)
    with pytest.raises(MessageRejectedError):
        check_join_change({**change(good), "extra": 1}, members, 10, 3, policy)
    # a key the policy refuses is an invalid proposal whatever its acks
    with pytest.raises(MessageRejectedError, match="allowlist"):
        check_join_change(change(good), members, 10, 3, AdmissionPolicy("allowlist"))
    with pytest.raises(MessageRejectedError, match="proof of work"):
        check_join_change(change(good), members, 10, 3, AdmissionPolicy("pow", pow_bits=12))


def test_a_proposal_may_admit_a_joiner_only_with_every_members_entry() -> None:
    """Checked by every member, not only by honest leaders."""
    signers, members = _members(3)

    async def go() -> None:
        node = await start_node()
        try:
            everyone = sorted([*members, node.node_id])
            proto = RoundProtocol(node, everyone)
            joiner = MessageSigner(NodeIdentity.generate())
            jid = joiner.identity.node_id
            acks = [s.sign("join_ack", {"peer": jid}, 4).to_wire() for s in signers]
            change = {"op": "join", "peer": jid, "acks": acks,
                      "req": joiner.sign("join", {"nonce": b""}).to_wire()}  # fmt: skip
            st = _Round(5, everyone)
            proto._check_changes(st, [change], "leader", 4)
            # a member whose own policy would refuse the key still accepts the proposal:
            # the q acks carry the members' vetting; a local re-check would split members
            # configured differently (issue 17 review)
            proto.admission = AdmissionPolicy("allowlist")
            assert proto.admission.refusal(open_signed(change["req"])) is not None
            proto._check_changes(st, [change], "leader", 4)
            with pytest.raises(MessageRejectedError, match="every member's entry"):
                proto._check_changes(st, [change], "leader", 3)
            proto.close()
        finally:
            await node.stop()

    run(go())


def test_pow_nonce_is_cheap_to_check_and_bound_to_the_key() -> None:
    pk = NodeIdentity.generate().public_key_bytes
    nonce = mint_pow(pk, 12)
    assert pow_ok(pk, nonce, 12)
    assert leading_zero_bits(pow_digest(pk, nonce)) >= 12
    assert not pow_ok(NodeIdentity.generate().public_key_bytes, nonce, 12) or True  # 2**-12
    assert not pow_ok(pk, b"x" * 64, 1)  # oversized nonces are refused outright
    assert leading_zero_bits(b"\x00\x0f" + b"\xff" * 30) == 12
    assert leading_zero_bits(bytes(32)) == 256


def test_allowlist_accepts_node_ids_and_public_keys_from_a_file(tmp_path: Any) -> None:
    a, b, c = (NodeIdentity.generate() for _ in range(3))
    path = tmp_path / "allow.txt"
    path.write_text(f"# members we trust\n{a.node_id}\n\n{b.public_key_bytes.hex()}  # bob\n")
    cfg = P2PConfig(join_policy="allowlist", join_allowlist_file=path)
    policy = AdmissionPolicy.from_config(cfg)
    for ident, ok in ((a, True), (b, True), (c, False)):
        req = MessageSigner(ident).sign("join", {"nonce": b""})
        assert (policy.refusal(req) is None) == ok
    with pytest.raises(ValidationError, match="join_allowlist"):
        P2PConfig(join_policy="allowlist")
    with pytest.raises(ValidationError, match=r"missing\.txt"):
        P2PConfig(join_policy="allowlist", join_allowlist_file=tmp_path / "missing.txt")


def test_join_table_is_bounded_and_expires() -> None:
    table = JoinTable(max_requests=3, ttl=10.0)
    signers = [MessageSigner(NodeIdentity.generate()) for _ in range(5)]
    for i, s in enumerate(signers):
        table.add_request(s.sign("join", {"nonce": b""}), now=float(i))
    assert len(table) == 3
    assert signers[0].identity.node_id not in table  # least recently refreshed went first
    table.prune(now=13.5)  # requests seen at t = 2, 3 expired (ttl 10)
    assert list(table) == [signers[4].identity.node_id]
    assert table.pop(signers[4].identity.node_id) is not None
    assert len(table) == 0
    # acks for invented joiners never push a known joiner out of a full table
    full = JoinTable(max_requests=2, ttl=10.0)
    for s in signers[:2]:
        full.add_request(s.sign("join", {"nonce": b""}), now=0.0)
    full.add_ack(signers[3].sign("join_ack", {"peer": "f" * 64}, 1), now=1.0)
    assert sorted(full) == sorted(s.identity.node_id for s in signers[:2])


# -- consensus_threshold -------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=400), st.floats(min_value=2 / 3, max_value=1.0))
def test_quorum_never_drops_below_n_minus_f_and_two_quorums_share_f_plus_1(
    n: int, t: float
) -> None:
    q, f = quorum(n, t), (n - 1) // 3
    assert n - f <= q <= n
    assert 2 * q - n >= f + 1  # any two quorums intersect in at least one honest member
    assert q >= quorum(n)
    assert quorum(n, 1.0) == n


def test_default_threshold_keeps_the_n_minus_f_quorum() -> None:
    assert [quorum(n, 2 / 3) for n in (1, 2, 3, 4, 5, 6, 7, 10)] == [1, 2, 3, 3, 4, 5, 5, 7]
    assert quorum(4, 0.9) == 4  # raising it costs liveness: at n = 4 all four are needed
    assert quorum(10, 0.8) == 8


def test_a_raised_threshold_flows_into_the_rounds() -> None:
    """consensus_threshold = 1.0: every round needs every member's vote and entry."""

    async def go() -> None:
        nodes, protos = await _swarm(4, consensus_threshold=1.0)
        try:
            for r in (1, 2):
                ds = await _decide(protos, r)
                assert len({tuple(d.digests) for d in ds}) == 1
                assert len(ds[0].entries) == 4
                assert len(ds[0].certificate["commits"]) == 4
        finally:
            await _close(nodes, protos)

    run(go())


def test_threshold_below_two_thirds_is_refused_at_config_load() -> None:
    with pytest.raises(ValidationError, match=r"consensus_threshold 0\.5 is below 2/3"):
        P2PConfig(consensus_threshold=0.5)
    with pytest.raises(ValidationError):
        P2PConfig(consensus_threshold=1.5)
    assert P2PConfig(consensus_threshold=0.67).consensus_threshold == 0.67
    assert P2PConfig().consensus_threshold == pytest.approx(2 / 3)
