"""Signed messages and the validation pipeline: what is dropped, counted and punished."""

from __future__ import annotations

import contextlib
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.p2p.errors import MessageRejectedError
from swarmlm.p2p.identity import NodeIdentity, canonical_encode
from swarmlm.p2p.messages import (
    MessageSigner,
    MessageValidator,
    PeerScores,
    ReplayGuard,
    open_signed,
    peek_envelope,
)


@pytest.fixture
def alice() -> MessageSigner:
    return MessageSigner(NodeIdentity.generate())


def test_signed_message_opens_to_the_same_content(alice: MessageSigner) -> None:
    msg = alice.sign("prepare", {"view": 2, "h": b"h" * 32}, round=7)
    got = open_signed(msg.to_wire())
    assert (got.kind, got.sender, got.round, got.body) == ("prepare", msg.sender, 7, msg.body)


def test_message_with_bad_signature_is_rejected_as_forged(alice: MessageSigner) -> None:
    wire = alice.sign("ping", {}).to_wire()
    wire["s"] = bytes(64)
    with pytest.raises(MessageRejectedError) as e:
        open_signed(wire)
    assert e.value.reason == "forged"


def test_message_claiming_another_sender_is_rejected_as_forged() -> None:
    mallory, victim = NodeIdentity.generate(), NodeIdentity.generate()
    m = {"k": "ping", "from": victim.node_id, "pk": mallory.public_key_bytes, "seq": 1,
         "r": 0, "ts": time.time(), "b": {}}  # fmt: skip
    raw = canonical_encode(m)
    with pytest.raises(MessageRejectedError) as e:
        open_signed({"m": raw, "s": mallory.sign(raw)})
    assert e.value.reason == "forged"


def test_message_with_unexpected_body_field_is_rejected_as_malformed(
    alice: MessageSigner,
) -> None:
    msg = alice.sign("prepare", {"view": 1, "h": b"x", "extra": 1})
    with pytest.raises(MessageRejectedError, match="fields") as e:
        open_signed(msg.to_wire())
    assert e.value.reason == "malformed"


def test_an_exact_duplicate_is_dropped_and_counted_but_never_scored(alice: MessageSigner) -> None:
    # an honest retry (the same signed frame sent again) must not cost its sender (#17 item 3)
    v = MessageValidator()
    msg = alice.sign("ping", {})
    v.check({"t": "msg", **msg.to_wire()}, alice.identity.node_id)
    with pytest.raises(MessageRejectedError) as e:
        v.check({"t": "msg", **msg.to_wire()}, alice.identity.node_id)
    assert e.value.reason == "duplicate"
    assert v.dropped["duplicate"] == 1
    assert v.scores.score(alice.identity.node_id) == 0.0


def test_a_replay_older_than_the_window_is_dropped_counted_and_scored(
    alice: MessageSigner,
) -> None:
    v = MessageValidator()
    v.replay.window = 4
    old = alice.sign("ping", {})
    for _ in range(6):
        v.check({"t": "msg", **alice.sign("ping", {}).to_wire()}, alice.identity.node_id)
    with pytest.raises(MessageRejectedError):
        v.check({"t": "msg", **old.to_wire()}, alice.identity.node_id)
    assert v.dropped["replayed"] == 1
    assert v.scores.score(alice.identity.node_id) < 0


def test_stale_message_is_dropped(alice: MessageSigner) -> None:
    v = MessageValidator(max_age=0.01)
    msg = alice.sign("ping", {})
    time.sleep(0.05)
    with pytest.raises(MessageRejectedError):
        v.check({"t": "msg", **msg.to_wire()}, alice.identity.node_id)
    assert v.dropped["stale"] == 1


def test_relayed_message_on_someone_elses_connection_is_refused(alice: MessageSigner) -> None:
    v = MessageValidator()
    msg = alice.sign("ping", {})
    with pytest.raises(MessageRejectedError):
        v.check({"t": "msg", **msg.to_wire()}, "b" * 64)
    assert v.dropped["wrong_sender"] == 1


def test_repeat_offender_is_blacklisted_then_forgiven_after_the_ban() -> None:
    scores = PeerScores(blacklist_threshold=-20, blacklist_seconds=0.05)
    for _ in range(3):
        scores.penalize("p", "forged")
    assert scores.is_blacklisted("p")
    v = MessageValidator(scores)
    with pytest.raises(MessageRejectedError):
        v.check({}, "p")
    assert v.dropped["blacklisted"] == 1
    time.sleep(0.1)
    assert not scores.is_blacklisted("p")


def test_replay_guard_accepts_out_of_order_but_not_repeats_or_ancient() -> None:
    g = ReplayGuard(window=10)
    assert g.check_and_record("a", 100)
    assert g.check_and_record("a", 95)
    assert not g.check_and_record("a", 95)
    assert not g.check_and_record("a", 80)
    assert g.check_and_record("b", 95)


_field_values = (
    st.none()
    | st.integers(-3, 3)
    | st.text(max_size=4)
    | st.binary(max_size=33)
    | st.floats(allow_nan=True)
    | st.dictionaries(st.text(max_size=3), st.integers(-(2**40), 2**40))
)
_envelopes = st.dictionaries(
    st.sampled_from(["k", "from", "pk", "seq", "r", "ts", "b"]), _field_values
).map(lambda d: msgpack.packb(d))


@settings(max_examples=300, deadline=None)
@given(m=st.binary(max_size=200) | _envelopes, s=st.binary(max_size=70))
def test_message_decoder_never_crashes_on_arbitrary_input(m: bytes, s: bytes) -> None:
    v = MessageValidator()
    for frame in ({"m": m, "s": s}, {"m": m}, {"t": "msg", "m": s, "s": m}):
        with contextlib.suppress(MessageRejectedError):
            v.check(frame, "x" * 64)


@given(st.binary(max_size=200))
def test_peek_envelope_never_raises_on_junk(data: bytes) -> None:
    """Read before any verification, so it must survive anything a peer sends."""
    claim = peek_envelope({"m": data, "s": b""})
    assert claim is None or (isinstance(claim[0], str) and isinstance(claim[2], int))


def test_peek_envelope_reads_kind_sender_and_seq_without_verifying() -> None:
    signer = MessageSigner(NodeIdentity.generate())
    msg = signer.sign("status_req", {}, 3)
    assert peek_envelope(msg.to_wire()) == ("status_req", msg.sender, msg.seq)
    # a forged signature does not matter to the peek (the frame is verified later)
    assert peek_envelope({**msg.to_wire(), "s": b"x" * 64}) == ("status_req", msg.sender, msg.seq)
    for junk in (None, {}, {"m": b"junk"}, {"m": msg.raw[:-3]}, {"m": b"\x81\xa1k\xa1x"}):
        assert peek_envelope(junk) is None
