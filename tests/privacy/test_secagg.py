"""Secure aggregation (swarmlm.privacy.secagg): exact sums, dropouts up to the threshold,
clean abandonment beyond it, and a named error for every bad input."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.p2p.identity import NodeIdentity
from swarmlm.privacy.secagg import (
    PRIME,
    SHARE_SIZE,
    BadShareError,
    BadSignatureError,
    DropoutError,
    EquivocationError,
    FixedPoint,
    GroupResult,
    MalformedMessageError,
    Message,
    NotAMemberError,
    Phase,
    SecAggError,
    SecAggPeer,
    SharesDoNotReconstructError,
    WrongLengthError,
    WrongRoundError,
    assign_groups,
    default_threshold,
    plain_ring_sum,
    robust_over_groups,
    shamir_reconstruct,
    shamir_split,
    simulate_group,
)

IDS = [NodeIdentity.generate() for _ in range(8)]
DIM = 257
CODEC = FixedPoint(clip=1.0, max_peers=8)


def _updates(ids: list[NodeIdentity], seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.node_id: rng.normal(size=DIM) * scale for i in ids}


def _live(run_peers: dict[str, SecAggPeer], dropped: set[str]) -> list[SecAggPeer]:
    return [p for v, p in run_peers.items() if v not in dropped]


def test_the_sum_of_eight_peers_is_recovered_bit_for_bit() -> None:
    ups = _updates(IDS)
    run = simulate_group(IDS, ups, codec=CODEC, seed=1)
    plain = plain_ring_sum(CODEC, ups.values())
    for p in run.peers.values():
        assert p.phase == Phase.DONE, p.abandoned
        assert p.result is not None
        assert np.array_equal(p.result.ring_sum, plain)
        assert p.rejected == []
    result = next(iter(run.peers.values())).result
    assert result is not None
    assert result.norm_ok
    np.testing.assert_allclose(result.total, sum(ups.values()), atol=8 / CODEC.scale)


def test_a_masked_input_alone_looks_nothing_like_the_update() -> None:
    seen: list[Message] = []

    def spy(m: Message) -> Message:
        seen.append(m)
        return m

    ups = _updates(IDS)
    simulate_group(IDS, ups, codec=CODEC, tamper=spy)
    masked = next(m for m in seen if m.kind == "masked" and m.sender == IDS[0].node_id)
    y = np.frombuffer(masked.fields["data"], dtype="<u4").view(np.int32)
    q = CODEC.encode(ups[IDS[0].node_id]).view(np.int32)
    # The quantised update is within +-5% of the int32 range; the masked one is uniform.
    assert np.abs(q).max() < 2**31 * 0.05
    assert np.abs(y.astype(np.float64)).mean() > 2**31 * 0.3


@pytest.mark.parametrize(
    "drops",
    [
        {0: "masked"},
        {3: "unmask"},
        {0: "masked", 5: "masked"},
        {1: "masked", 6: "unmask"},
        {2: "survivors", 7: "unmask"},
    ],
)
def test_up_to_k_minus_t_peers_may_drop_mid_round(drops: dict[int, str]) -> None:
    assert len(IDS) - default_threshold(len(IDS)) == 2
    ups = _updates(IDS, seed=len(drops))
    drop = {IDS[i].node_id: kind for i, kind in drops.items()}
    run = simulate_group(IDS, ups, codec=CODEC, drop_before=drop)
    # A peer that dropped before masking is not in the sum; one that masked is.
    absent = {IDS[i].node_id for i, k in drops.items() if k == "masked"}
    plain = plain_ring_sum(CODEC, [u for v, u in ups.items() if v not in absent])
    for p in _live(run.peers, set(drop)):
        assert p.phase == Phase.DONE, p.abandoned
        assert p.result is not None
        assert set(p.result.survivors) == set(ups) - absent
        assert np.array_equal(p.result.ring_sum, plain)


def test_more_dropouts_than_the_threshold_abandon_the_round_without_a_sum() -> None:
    drop = {IDS[i].node_id: "masked" for i in (0, 1, 2)}
    run = simulate_group(IDS, _updates(IDS), codec=CODEC, drop_before=drop)
    for p in _live(run.peers, set(drop)):
        assert p.phase == Phase.ABANDONED
        assert p.result is None
        assert isinstance(p.abandoned, DropoutError)
        assert "only 5 masked inputs, the threshold is 6" in str(p.abandoned)


def test_too_many_unmasking_dropouts_abandon_rather_than_guess() -> None:
    drop = {IDS[i].node_id: "unmask" for i in (0, 1, 2)}
    run = simulate_group(IDS, _updates(IDS), codec=CODEC, drop_before=drop)
    for p in _live(run.peers, set(drop)):
        assert p.phase == Phase.ABANDONED
        assert p.result is None
        assert "not enough unmasking shares" in str(p.abandoned)


def test_a_member_missing_from_the_key_phase_is_named() -> None:
    drop = {IDS[4].node_id: "share"}
    run = simulate_group(IDS, _updates(IDS), codec=CODEC, drop_before=drop)
    for p in _live(run.peers, set(drop)):
        assert isinstance(p.abandoned, DropoutError)
        assert IDS[4].node_id[:12] in str(p.abandoned)


def test_messages_in_any_order_give_the_same_sum() -> None:
    ids = IDS[:5]
    ups = _updates(ids, seed=7)
    members = {i.node_id: i.public_key_bytes for i in ids}
    peers = {i.node_id: SecAggPeer(i, 3, 0, members, DIM, CODEC) for i in ids}
    pending: list[tuple[str, bytes]] = []
    for v, p in peers.items():
        pending += [(v, m.to_bytes()) for m in p.start(ups[v], 0.0)]
    shuffle = random.Random(0)
    while pending:
        shuffle.shuffle(pending)
        author, data = pending.pop()
        for v, p in peers.items():
            if v != author:
                pending += [(v, m.to_bytes()) for m in p.receive(data, 0.0)]
    plain = plain_ring_sum(CODEC, ups.values())
    for p in peers.values():
        assert p.result is not None, p.abandoned
        assert np.array_equal(p.result.ring_sum, plain)


class _Round:
    """Five peers stopped just before masking, so single messages can be aimed at one."""

    def __init__(self) -> None:
        self.ids = IDS[:5]
        self.members = {i.node_id: i.public_key_bytes for i in self.ids}
        self.peers = {i.node_id: SecAggPeer(i, 9, 2, self.members, DIM, CODEC) for i in self.ids}
        self.masked: dict[str, Message] = {}
        queue: list[tuple[str, Message]] = []
        for v, p in self.peers.items():
            queue += [(v, m) for m in p.start(np.zeros(DIM), 0.0)]
        while queue:
            author, msg = queue.pop(0)
            if msg.kind == "masked":
                self.masked[author] = msg
                continue
            for v, p in self.peers.items():
                if v != author:
                    queue += [(v, m) for m in p.receive(msg, 0.0)]

    @property
    def target(self) -> SecAggPeer:
        return self.peers[self.ids[0].node_id]


@functools.cache
def _shared_round() -> _Round:
    """One stopped round for the property test (building one per example costs ~0.1 s)."""
    return _Round()


@pytest.fixture
def stopped() -> _Round:
    return _Round()


def _resign(who: NodeIdentity, msg: Message, **changes: object) -> Message:
    fields = dict(msg.fields)
    fields.update(changes.pop("fields", {}))  # type: ignore[call-overload]
    kw = {"round": msg.round, "group": msg.group, **changes}
    return Message.signed(who, msg.kind, kw["round"], kw["group"], fields)  # type: ignore[arg-type]


def test_bad_masked_inputs_are_rejected_by_name(stopped: _Round) -> None:
    alice = stopped.ids[1]
    good = stopped.masked[alice.node_id]
    short = _resign(alice, good, fields={"dim": DIM - 1, "data": good.fields["data"][:-4]})
    with pytest.raises(WrongLengthError, match=f"has {DIM - 1} values"):
        stopped.target.receive(short, 0.0)
    with pytest.raises(WrongRoundError, match="round 10 group 2, this is round 9 group 2"):
        stopped.target.receive(_resign(alice, good, round=10), 0.0)
    with pytest.raises(WrongRoundError, match="group 3"):
        stopped.target.receive(_resign(alice, good, group=3), 0.0)
    forged = Message(good.kind, good.round, good.group, good.sender, good.fields, bytes(64))
    with pytest.raises(BadSignatureError):
        stopped.target.receive(forged, 0.0)
    outsider = IDS[6]
    with pytest.raises(NotAMemberError):
        stopped.target.receive(_resign(outsider, good), 0.0)
    with pytest.raises(MalformedMessageError, match="field 'data'"):
        stopped.target.receive(_resign(alice, good, fields={"data": "text"}), 0.0)
    # None of it changed the state: the genuine message is still accepted.
    stopped.target.receive(good, 0.0)
    assert stopped.target.peers[alice.node_id].masked is not None
    with pytest.raises(EquivocationError):
        stopped.target.receive(_resign(alice, good, fields={"data": bytes(4 * DIM)}), 0.0)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_a_peer(data: bytes) -> None:
    peer = SecAggPeer(IDS[0], 0, 0, {i.node_id: i.public_key_bytes for i in IDS[:3]}, 4, CODEC)
    with contextlib.suppress(SecAggError):
        peer.receive(data, 0.0)
    assert peer.phase == Phase.ADVERTISE


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mangled_wire_messages_are_rejected_by_name(data: st.DataObject) -> None:
    stopped = _shared_round()
    wire = bytearray(stopped.masked[stopped.ids[1].node_id].to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(SecAggError):
        stopped.target.receive(bytes(wire), 0.0)
    # Whatever got through was genuine: the target's view of peer 1 is the signed original.
    got = stopped.target.peers[stopped.ids[1].node_id].masked
    assert got is None or got.tobytes() == stopped.masked[stopped.ids[1].node_id].fields["data"]


def _liar(liar: NodeIdentity) -> Callable[[Message], Message]:
    """A holder that reveals every self-mask share off by one, signed as its own."""

    def lie(m: Message) -> Message:
        if m.kind != "unmask" or m.sender != liar.node_id:
            return m
        b = {
            k: (int.from_bytes(v, "big") + 1).to_bytes(SHARE_SIZE, "big")
            for k, v in m.fields["b_shares"].items()
        }
        return _resign(liar, m, fields={"b_shares": b})

    return lie


def test_a_share_revealed_falsely_never_changes_the_sum() -> None:
    liar = IDS[2]
    ups = _updates(IDS)
    run = simulate_group(IDS, ups, codec=CODEC, tamper=_liar(liar))
    plain = plain_ring_sum(CODEC, ups.values())
    for p in run.peers.values():
        assert p.result is not None, p.abandoned
        assert np.array_equal(p.result.ring_sum, plain)


def test_a_false_share_that_was_needed_abandons_the_round_naming_the_liar() -> None:
    # Two dropouts leave exactly t = 6 revealers, the liar among them: no sum is possible.
    liar = IDS[2]
    drop = {IDS[0].node_id: "unmask", IDS[7].node_id: "unmask"}
    run = simulate_group(IDS, _updates(IDS), codec=CODEC, tamper=_liar(liar), drop_before=drop)
    for v, p in run.peers.items():
        if v in drop or v == liar.node_id:  # the liar's own machine saw its honest shares
            continue
        assert p.result is None
        assert isinstance(p.abandoned, DropoutError)
        assert any(
            isinstance(e, BadShareError) and liar.node_id[:12] in str(e) for e in p.rejected
        ), p.rejected


def test_inconsistent_shares_from_a_dealer_abandon_the_round_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import swarmlm.privacy.secagg as sa

    dealer = IDS[5].node_id
    real_split: Callable[..., list[int]] = sa.shamir_split
    real_share_message = SecAggPeer._share_message

    def skewed(
        secret: int, threshold: int, xs: list[int], rng: Callable[[int], bytes]
    ) -> list[int]:
        shares = real_split(secret, threshold, xs, rng)
        for i in range(3):  # any t = 6 of the 8 shares include one off the polynomial
            shares[i] = (shares[i] + 1) % PRIME  # ...and the dealer commits to it
        return shares

    def share_message(self: SecAggPeer) -> Message:
        if self.me.node_id != dealer:
            return real_share_message(self)
        with monkeypatch.context() as m:
            m.setattr(sa, "shamir_split", skewed)
            return real_share_message(self)

    monkeypatch.setattr(SecAggPeer, "_share_message", share_message)
    run = simulate_group(IDS, _updates(IDS), codec=CODEC)
    for p in run.peers.values():
        assert p.result is None
        assert isinstance(p.abandoned, SharesDoNotReconstructError), p.abandoned
        assert dealer[:12] in str(p.abandoned)


@settings(max_examples=60, deadline=None)
@given(secret=st.integers(0, 2**256 - 1), n=st.integers(1, 10), data=st.data())
def test_any_t_shamir_shares_rebuild_the_secret_and_t_minus_1_do_not(
    secret: int, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n))
    xs = list(range(1, n + 1))
    shares = shamir_split(secret, t, xs, random.Random(data.draw(st.integers())).randbytes)
    pick = data.draw(st.permutations(list(zip(xs, shares, strict=True))))
    assert shamir_reconstruct(pick[:t]) == secret
    if t > 1:
        assert shamir_reconstruct(pick[: t - 1]) != secret


def test_the_fixed_point_sum_of_max_peers_extremes_does_not_wrap() -> None:
    codec = FixedPoint(clip=2.0, max_peers=8)
    ups = [np.array([2.0, -2.0, 0.0]) for _ in range(8)]  # norm 2.83 > clip: scaled down
    total = codec.decode_sum(plain_ring_sum(codec, ups))
    np.testing.assert_allclose(total, 8 * np.array([2.0, -2.0, 0.0]) / np.sqrt(2), rtol=1e-8)
    edge = [np.array([2.0]) for _ in range(8)]
    assert codec.decode_sum(plain_ring_sum(codec, edge))[0] == pytest.approx(16.0, rel=1e-8)
    with pytest.raises(SecAggError, match="non-finite"):
        codec.encode(np.array([np.nan]))


def test_groups_come_from_the_seed_and_cover_everyone() -> None:
    members = [f"peer-{i:02d}" for i in range(23)]
    a = assign_groups(b"seed-1", members, 4)
    assert a == assign_groups(b"seed-1", list(reversed(members)), 4)
    assert a != assign_groups(b"seed-2", members, 4)
    assert sorted(m for g in a for m in g) == sorted(members)
    assert [len(g) for g in a] == [5, 5, 5, 4, 4]
    with pytest.raises(SecAggError, match="groups of 4 from 3"):
        assign_groups(b"s", members[:3], 4)


def _group(group: int, mean: float, size: int = 4, dim: int = 3) -> GroupResult:
    total = np.full(dim, mean * size)
    return GroupResult(
        0, group, tuple(f"p{i}" for i in range(size)), np.zeros(dim, np.uint32), total, True
    )


def test_robust_rule_over_groups_drops_a_norm_breaking_group_and_resists_one_bad_group() -> None:
    results = [_group(g, 1.0) for g in range(4)] + [_group(4, -50.0)]
    agg, dropped = robust_over_groups(results, "median", f_peers=1)
    assert dropped == []
    np.testing.assert_allclose(agg.numpy(), [1.0, 1.0, 1.0])
    broken = _group(5, 0.0)
    broken = GroupResult(0, 5, broken.survivors, broken.ring_sum, broken.total, False)
    agg, dropped = robust_over_groups([*results[:4], broken], "median", f_peers=1)
    assert dropped == [5]


def test_a_share_that_overtakes_its_advertisement_is_held_then_used() -> None:
    ids = IDS[:3]
    a, b, c = (i.node_id for i in ids)
    ups = _updates(ids, seed=3)
    members = {i.node_id: i.public_key_bytes for i in ids}
    peers = {i.node_id: SecAggPeer(i, 0, 0, members, DIM, CODEC) for i in ids}
    ads = {v: p.start(ups[v], 0.0)[0] for v, p in peers.items()}
    queue: list[tuple[str, Message]] = []
    for v in (a, b):
        for u in (a, b, c):
            if u != v:
                queue += [(v, m) for m in peers[v].receive(ads[u], 0.0)]
    share_a = next(m for author, m in queue if author == a and m.kind == "share")
    assert peers[c].receive(share_a, 0.0) == []  # held: c has no advertisement yet
    other = _resign(ids[0], share_a, fields={"b_commit": bytes(32)})
    with pytest.raises(EquivocationError):
        peers[c].receive(other, 0.0)
    for u in (a, b):
        queue += [(c, m) for m in peers[c].receive(ads[u], 0.0)]
    while queue:
        author, msg = queue.pop(0)
        for v, p in peers.items():
            if v != author:
                queue += [(v, m) for m in p.receive(msg, 0.0)]
    plain = plain_ring_sum(CODEC, ups.values())
    for p in peers.values():
        assert p.result is not None, p.abandoned
        assert np.array_equal(p.result.ring_sum, plain)
