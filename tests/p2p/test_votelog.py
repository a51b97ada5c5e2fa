"""The vote log: what a node signed survives a crash, and it never signs a slot twice."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.messages import MessageSigner, SignedMessage
from swarmlm.p2p.votelog import MAGIC, VoteLog, VoteLogError, same_meaning

SIGNER = MessageSigner(NodeIdentity.generate())


def _vote(kind: str, r: int, view: int, h: bytes) -> SignedMessage:
    return SIGNER.sign(kind, {"view": view, "h": h}, r)


def _contrib(r: int, digest: bytes) -> SignedMessage:
    return SIGNER.sign("contrib", {"digest": digest, "size": 7}, r)


def test_signed_slots_and_the_lock_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "votes.log"
    vl = VoteLog(path)
    c = vl.append(_contrib(3, b"d" * 32))
    p = _vote("prepare", 3, 0, b"h" * 32)
    cm = _vote("commit", 3, 0, b"h" * 32)
    cert = {"proposal": {"m": b"x", "s": b"y"}, "votes": []}
    vl.record(p, 0)
    vl.record(cm, 0, prepared=cert)
    vl.flush()
    vl.close()

    again = VoteLog(path)
    assert len(again) == 3
    got = again.get("contrib", 3)
    assert got is not None
    assert got.wire == c.wire
    assert got.message.body["digest"] == b"d" * 32
    commit = again.get("commit", 3, 0)
    assert commit is not None
    assert commit.prepared == cert
    assert commit.wire == cm.to_wire()
    assert again.get("prepare", 3, 1) is None
    assert [s.kind for s in again.slots(3)] == ["contrib", "prepare", "commit"]


def test_several_records_written_in_one_flush_cost_one_fsync(tmp_path: Path) -> None:
    vl = VoteLog(tmp_path / "votes.log")
    for view in range(3):
        vl.record(_vote("prepare", 1, view, b"h" * 32), view)
    vl.flush()
    vl.flush()  # nothing pending: no second fsync
    assert vl.fsyncs == 1
    assert len(VoteLog(tmp_path / "votes.log")) == 3


def test_a_slot_is_never_recorded_twice(tmp_path: Path) -> None:
    vl = VoteLog(tmp_path / "votes.log")
    vl.append(_vote("prepare", 5, 1, b"a" * 32), 1)
    with pytest.raises(VoteLogError, match="already signed"):
        vl.record(_vote("prepare", 5, 1, b"b" * 32), 1)
    vl.record(_contrib(5, b"x" * 32))
    with pytest.raises(VoteLogError, match="already signed"):
        vl.record(_contrib(5, b"y" * 32))
    # same slot, same meaning (a re-signed copy) vs a conflicting one
    a, b = _vote("commit", 5, 1, b"a" * 32), _vote("commit", 5, 1, b"b" * 32)
    assert same_meaning("commit", a.body, _vote("commit", 5, 1, b"a" * 32).body)
    assert not same_meaning("commit", a.body, b.body)
    assert not same_meaning("contrib", _contrib(5, b"x" * 32).body, _contrib(5, b"y" * 32).body)
    prop = {"view": 0, "entries": [["p", 1]], "changes": [], "justify": [], "m": b"m" * 32}
    assert same_meaning("propose", prop, {**prop, "justify": [1, 2], "suspects": []})
    assert not same_meaning("propose", prop, {**prop, "suspects": ["x"]})


def test_a_torn_last_record_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "votes.log"
    vl = VoteLog(path)
    vl.append(_contrib(1, b"a" * 32))
    vl.append(_vote("prepare", 1, 0, b"h" * 32))
    vl.close()
    whole = path.stat().st_size
    for cut in (1, 9, 40):  # inside the payload, inside the frame header
        data = path.read_bytes()
        path.write_bytes(data[: whole - cut] if cut < whole else data)
        with caplog.at_level(logging.WARNING, logger="swarmlm.p2p.votelog"):
            again = VoteLog(path)
        assert "dropping" in caplog.text
        assert str(path) in caplog.text
        assert again.get("contrib", 1) is not None
        assert again.get("prepare", 1, 0) is None
        again.append(_vote("prepare", 1, 0, b"h" * 32))  # appends after the last whole record
        again.close()
        assert VoteLog(path).get("prepare", 1, 0) is not None
        caplog.clear()
    # a crash while the header of a new file was being written
    fresh = tmp_path / "new.log"
    fresh.write_bytes(MAGIC[:5])
    assert len(VoteLog(fresh)) == 0
    assert fresh.read_bytes() == MAGIC


def test_corruption_before_the_end_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "votes.log"
    vl = VoteLog(path)
    vl.append(_contrib(1, b"a" * 32))
    vl.append(_vote("prepare", 1, 0, b"h" * 32))
    vl.close()
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 20] ^= 0xFF  # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(VoteLogError, match=r"votes\.log.*byte 16.*corrupt"):
        VoteLog(path)
    other = tmp_path / "other.log"
    other.write_bytes(b"definitely not a vote log")
    with pytest.raises(VoteLogError, match=r"other\.log.*bad header"):
        VoteLog(other)


def test_pruning_rewrites_atomically_and_refuses_forgotten_rounds(tmp_path: Path) -> None:
    path = tmp_path / "votes.log"
    vl = VoteLog(path, keep_rounds=8)
    for r in range(1, 21):
        vl.record(_contrib(r, bytes([r]) * 32))
    vl.flush()
    assert not vl.maybe_prune(9)  # nothing is a quarter window past due yet
    assert vl.maybe_prune(20)  # rounds < 12 go
    assert vl.rounds() == list(range(12, 21))
    assert vl.floor == 12
    assert vl.forgotten(11)
    assert not vl.forgotten(12)
    with pytest.raises(VoteLogError, match="below the floor"):
        vl.record(_contrib(3, b"z" * 32))
    vl.append(_contrib(21, b"y" * 32))  # appending continues on the rewritten file
    vl.close()
    # the rewrite went through swarmlm.atomic: no temporary left, still private to the owner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["votes.log"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = VoteLog(path, keep_rounds=8)
    assert again.floor == 12
    assert again.rounds() == list(range(12, 22))
    # a crash before the rename leaves a stray temporary file: the log itself is intact
    path.with_name("votes.log.tmp").write_bytes(b"half a rewrite")
    assert VoteLog(path, keep_rounds=8).rounds() == list(range(12, 22))
