"""Lightweight voters in a round: their abstain entries count toward the quorum but never
toward the aggregate, the reputation or the absent list; the voter reads only the config it
needs and waits for the trainers before abstaining."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from swarmlm.swarm import voter as voter_module
from swarmlm.swarm.abstain import ABSTAIN_MAGIC, encode_abstain, is_abstain
from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.engine import RoundEngine
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.params import ParamLayout
from swarmlm.swarm.voter import VoterConfig, VoterNode, load_voter_config
from swarmlm.train.config import OptimConfig
from tests.swarm.conftest import peer_id

pytestmark = pytest.mark.timeout(60)

D = 64
LAYOUT = ParamLayout(("a", "b"), ((8, 4), (32,)))
SWARM_TINY = Path(__file__).resolve().parents[2] / "configs" / "swarm-tiny.json"


def engine(**cfg: Any) -> RoundEngine:
    return RoundEngine(SwarmConfig(**cfg), LAYOUT, torch.linspace(-1, 1, D), OptimConfig())


# -- the entry -----------------------------------------------------------------------------------
def test_abstain_entries_are_recognised_and_distinct_per_voter() -> None:
    a, b = encode_abstain(3, "light-a"), encode_abstain(3, "light-b")
    assert is_abstain(a)
    assert is_abstain(memoryview(b))
    assert is_abstain(bytearray(a))
    assert a != b  # distinct digests within one round
    assert a.startswith(ABSTAIN_MAGIC)
    assert len(encode_abstain(1, "x" * 1000)) <= 12 + 128  # the node id part is bounded


def test_updates_and_short_or_foreign_data_are_not_abstentions() -> None:
    e = engine()
    assert not is_abstain(e.contribution(1, torch.zeros(D), 4))
    assert not is_abstain(ABSTAIN_MAGIC)  # too short to hold a round
    assert not is_abstain(b"")
    assert not is_abstain(b"SWAX" + bytes(8))


# -- the engine --------------------------------------------------------------------------------
def test_voters_count_in_the_round_but_never_in_the_aggregate() -> None:
    gen = torch.Generator().manual_seed(0)
    updates = [torch.randn(D, generator=gen) for _ in range(4)]
    trainers = [peer_id(i) for i in range(4)]
    voters = [peer_id(100), peer_id(101)]
    with_voters, baseline = engine(), engine()
    entries = [
        (p, with_voters.contribution(1, u, 4)) for p, u in zip(trainers, updates, strict=True)
    ]
    abstentions = [(v, encode_abstain(1, v)) for v in voters]

    report = with_voters.apply(1, entries + abstentions, members=trainers + voters)
    ref = baseline.apply(1, entries, members=trainers)

    assert report.voters == sorted(voters)
    assert report.accepted == ref.accepted == sorted(trainers)
    assert report.invalid == {}
    assert report.absent == []
    assert report.stale == []
    assert report.excluded == []
    assert report.flagged == ref.flagged
    assert report.applied
    assert report.entries == len(entries) + len(voters)
    # the voters changed neither the parameters nor any reputation (the states differ only
    # in the membership they record)
    assert torch.equal(with_voters.params, baseline.params)
    assert with_voters.reputation == baseline.reputation
    assert with_voters.members == sorted(trainers + voters)
    baseline.members = with_voters.members
    baseline._changed()
    assert with_voters.state_digest() == baseline.state_digest()
    assert not set(voters) & set(with_voters.reputation)
    assert not set(voters) & set(with_voters.momenta)


def test_a_round_of_voters_alone_advances_without_changing_the_parameters() -> None:
    e = engine()
    before = e.params.clone()
    voters = [peer_id(100), peer_id(101), peer_id(102)]
    report = e.apply(1, [(v, encode_abstain(1, v)) for v in voters], members=voters)
    assert report.voters == voters
    assert not report.applied
    assert report.accepted == []
    assert report.invalid == {}
    assert e.round == 1
    assert torch.equal(e.params, before)


def test_a_member_that_sent_nothing_is_absent_even_when_voters_abstained() -> None:
    e = engine(join_grace_rounds=0)  # (no grace for a member that has never contributed)
    trainers = [peer_id(i) for i in range(3)]
    missing, light = peer_id(9), peer_id(100)
    entries = [(p, e.contribution(1, torch.ones(D) * 0.01, 4)) for p in trainers]
    report = e.apply(
        1, [*entries, (light, encode_abstain(1, light))], members=[*trainers, missing, light]
    )
    assert report.absent == [missing]
    assert report.voters == [light]
    assert e.reputation[missing] < 1.0
    assert light not in e.reputation


def test_corrupt_data_is_still_invalid_next_to_abstentions() -> None:
    e = engine()
    light, bad = peer_id(100), peer_id(7)
    good = [(peer_id(i), e.contribution(1, torch.zeros(D), 4)) for i in range(3)]
    report = e.apply(1, [*good, (light, encode_abstain(1, light)), (bad, b"garbage")])
    assert list(report.invalid) == [bad]
    assert report.voters == [light]


# -- the voter's config --------------------------------------------------------------------------
def test_voter_reads_only_the_swarm_and_p2p_parts_of_a_swarm_config(tmp_path: Path) -> None:
    raw = json.loads(SWARM_TINY.read_text(encoding="utf-8"))
    raw["model"] = {"d_model": "not a number", "made_up": True}  # the trainers' business
    raw["data"] = None
    path = tmp_path / "swarm.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    cfg = load_voter_config(path, ["swarm.rounds=3", "p2p.port=0", 'p2p.bootstrap=[["h", 1]]'])
    assert cfg.swarm.rounds == 3
    assert cfg.swarm.expect_peers == raw["swarm"]["expect_peers"]
    assert cfg.p2p.round_timeout == raw["p2p"]["round_timeout"]
    assert cfg.p2p.bootstrap == [("h", 1)]


@pytest.mark.parametrize(
    ("override", "field"),
    [("swarm.rounds=0", "swarm.rounds"), ("p2p.port=99999", "p2p.port")],
)
def test_voter_config_errors_name_the_file_and_field(
    tmp_path: Path, override: str, field: str
) -> None:
    path = tmp_path / "swarm.json"
    path.write_text(SWARM_TINY.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(SwarmError, match=f"swarm.json: invalid swarm config\n.*{field}"):
        load_voter_config(path, [override])


def test_voter_config_yaml_is_read_and_unparsable_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "swarm.yaml"
    path.write_text("swarm: {rounds: 3}\n", encoding="utf-8")
    assert load_voter_config(path).swarm.rounds == 3
    path.write_text("swarm: {rounds: [3\n", encoding="utf-8")
    with pytest.raises(SwarmError, match=r"swarm\.yaml: cannot parse"):
        load_voter_config(path)


# -- when the voter abstains ----------------------------------------------------------------------
class FakeProtocol:
    """Contributors of a round appear at scripted event-loop steps."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.decisions: dict[int, Any] = {}

    def contributors(self, r: int) -> set[str]:
        return set(self.seen)


def voter(round_timeout: float = 30.0, is_voter: Any = None) -> VoterNode:
    cfg = VoterConfig.model_validate({"swarm": {"round_timeout": round_timeout}})
    p2p: Any = SimpleNamespace(node_id="me")
    return VoterNode(cfg, p2p, is_voter=is_voter or (lambda peer: peer.startswith("light")))


async def wait_and_feed(
    v: VoterNode, proto: FakeProtocol, members: list[str], feed: list[set[str]]
) -> None:
    """Run the wait while ``feed`` adds contributors step by step; it must not return
    before the last step."""
    task = asyncio.create_task(v._wait_for_trainers(proto, 1, members))  # type: ignore[arg-type]
    for step in feed:
        await asyncio.sleep(0.06)
        assert not task.done(), f"abstained early, having seen only {sorted(proto.seen)}"
        proto.seen |= step
    await asyncio.wait_for(task, 10)


def test_voter_waits_for_every_trainer_but_not_for_other_voters() -> None:
    v = voter()
    proto = FakeProtocol()
    members = ["me", "t1", "t2", "light-2"]
    asyncio.run(wait_and_feed(v, proto, members, [{"t1"}, {"t2"}]))
    assert proto.seen == {"t1", "t2"}


def test_voter_stops_waiting_once_the_round_is_decided() -> None:
    v = voter()
    proto = FakeProtocol()

    async def scenario() -> None:
        task = asyncio.create_task(v._wait_for_trainers(proto, 1, ["me", "t1"]))  # type: ignore[arg-type]
        await asyncio.sleep(0.06)
        assert not task.done()
        proto.decisions[1] = object()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())


class VirtualTime:
    """The voter's clock and poll sleep, in virtual seconds: the wait runs its real logic
    (deadline, allowance, 50 ms polls) instantly, and the test reads when it returned."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    vt = VirtualTime()
    monkeypatch.setattr(voter_module, "time", SimpleNamespace(monotonic=vt.monotonic))
    monkeypatch.setattr(voter_module, "asyncio", SimpleNamespace(sleep=vt.sleep))
    return vt


POLL_S = 0.05  # the voter polls the protocol for contributors every 50 ms


def waited(v: VoterNode, proto: FakeProtocol, members: list[str], clock: VirtualTime) -> float:
    """Virtual seconds the voter waited before deciding to abstain (or to stop waiting)."""
    asyncio.run(v._wait_for_trainers(proto, 1, members))  # type: ignore[arg-type]
    return clock.now


def test_voter_abstains_without_a_straggler_once_its_allowance_has_passed(
    clock: VirtualTime,
) -> None:
    proto = FakeProtocol()
    proto.seen = {"t1"}  # t2 crashed: it never contributes
    v = voter(round_timeout=30.0)
    # no previous round: the allowance is MIN_STRAGGLER_S after the first contribution was seen
    # (at the first poll), not the 30 s round timeout
    allowance = voter_module.MIN_STRAGGLER_S
    assert allowance < waited(v, proto, ["me", "t1", "t2"], clock) <= allowance + 2 * POLL_S
    # after a slow round the allowance grows to half of it
    clock.now = 0.0
    v._last_round_s = 12.0
    assert 6.0 < waited(v, proto, ["me", "t1", "t2"], clock) <= 6.0 + 2 * POLL_S


def test_voter_gives_up_at_the_round_timeout_when_nobody_contributes(clock: VirtualTime) -> None:
    v = voter(round_timeout=30.0)  # nobody seen: the straggler allowance never starts
    assert 30.0 <= waited(v, FakeProtocol(), ["me", "t1"], clock) <= 30.0 + POLL_S


def test_a_voter_alone_with_voters_abstains_at_once(clock: VirtualTime) -> None:
    assert waited(voter(), FakeProtocol(), ["me", "light-2", "light-3"], clock) == 0.0
