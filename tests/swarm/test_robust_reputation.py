"""Robustness the swarm engine keeps as consensus state (issue 19 items 4 and 5): the
reputation filter in front of the robust rule, replay evidence against stale work claimed as
fresh, eviction by evidence within a window of swarm time, who was left out and why, and
contributions weighted by the samples they cover."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmlm.swarm.config import SwarmConfig
from swarmlm.swarm.contribution import encode_contribution
from swarmlm.swarm.engine import RoundEngine
from swarmlm.swarm.params import ParamLayout
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker
from swarmlm.train.config import OptimConfig
from tests.swarm.conftest import peer_id, swarm_config

pytestmark = pytest.mark.timeout(300)

D = 64
LAYOUT = ParamLayout(("a", "b"), ((8, 4), (32,)))


def engines(n: int, **cfg: Any) -> list[RoundEngine]:
    sw = SwarmConfig(**cfg)
    return [RoundEngine(sw, LAYOUT, torch.linspace(-1, 1, D), OptimConfig()) for _ in range(n)]


def apply_all(es: list[RoundEngine], r: int, entries: list[tuple[str, bytes]]) -> list[Any]:
    members = [peer_id(i) for i in range(len(es))]
    reports = [e.apply(r, entries, members=members) for e in es]
    assert len({e.state_digest() for e in es}) == 1, f"round {r}: states differ"
    return reports


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_reputation_filter_leaves_out_a_peer_pulling_against_the_swarm() -> None:
    """Heterogeneous honest peers (a shared direction plus a peer-specific part as large) and
    a sign flipper: the flipper's running cosine turns negative and the filter leaves it out
    of the aggregate on every peer alike; no honest peer is ever left out."""
    es = engines(5)
    gen = torch.Generator().manual_seed(7)
    filtered: list[list[str]] = []
    left_out_rounds = 0
    for r in range(1, 9):
        common = torch.randn(D, generator=gen)
        updates = [common + torch.randn(D, generator=gen) for _ in range(4)]
        updates.append(-(common + torch.randn(D, generator=gen)))
        entries = [(peer_id(i), es[i].contribution(r, u, 4)) for i, u in enumerate(updates)]
        reports = apply_all(es, r, entries)
        assert len({tuple(rep.filtered) for rep in reports}) == 1
        filtered.append(reports[0].filtered)
        left_out_rounds += peer_id(4) not in reports[0].accepted
        if peer_id(4) in reports[0].filtered:
            assert "reputation filter" in reports[0].left_out[peer_id(4)]
            assert peer_id(4) not in reports[0].accepted
    assert all(set(f) <= {peer_id(4)} for f in filtered)
    assert sum(peer_id(4) in f for f in filtered) >= 3
    # once its outlier reputation is below exclude_below, it is excluded before the filter
    assert left_out_rounds >= 6
    assert (
        es[0].filter_scores[peer_id(4)] < 0 < min(es[0].filter_scores[peer_id(i)] for i in range(4))
    )


def test_without_the_filter_the_sign_flipper_stays_in_the_aggregate() -> None:
    es = engines(5, reputation_filter=False)
    gen = torch.Generator().manual_seed(7)
    for r in range(1, 5):
        common = torch.randn(D, generator=gen)
        updates = [common + torch.randn(D, generator=gen) for _ in range(4)]
        updates.append(-(common + torch.randn(D, generator=gen)))
        entries = [(peer_id(i), es[i].contribution(r, u, 4)) for i, u in enumerate(updates)]
        reports = apply_all(es, r, entries)
        assert reports[0].filtered == []
        assert es[0].filter_scores == {}


def test_a_replayed_update_is_left_out_as_stale_and_counts_as_evidence() -> None:
    """Peer 3 sends its round-1 update again (re-encoded with its error feedback, stamped
    with the current state: the digests cannot tell). From round 2 on it is left out as
    stale, each round is one piece of evidence, and after 3 the members' verdict is to evict
    it, naming the evidence. Honest peers (fresh updates) are never touched."""
    es = engines(4, codec="int8")
    gen = torch.Generator().manual_seed(3)
    first = None
    for r in range(1, 5):
        updates = [torch.randn(D, generator=gen) for _ in range(4)]
        if first is None:
            first = updates[3].clone()
        updates[3] = first
        entries = [(peer_id(i), es[i].contribution(r, u, 4)) for i, u in enumerate(updates)]
        reports = apply_all(es, r, entries)
        rep = reports[0]
        if r == 1:
            assert rep.replayed == {}
            assert rep.left_out == {}
            continue
        assert set(rep.replayed) == {peer_id(3)}
        src, cos = rep.replayed[peer_id(3)]
        assert src == peer_id(3)
        assert cos > 0.99
        assert rep.left_out[peer_id(3)].startswith("stale: repeats its own earlier update")
        assert rep.evidence == {peer_id(3): "replay"}
        assert peer_id(3) not in rep.accepted
        assert sorted(rep.accepted) == [peer_id(i) for i in range(3)]
    for e in es:
        assert e.evidence_count(peer_id(3)) == 3
        why = e.eviction_reason(peer_id(3))
        assert why is not None
        assert "3 pieces of evidence" in why
        assert "replay" in why
        assert all(e.eviction_reason(peer_id(i)) is None for i in range(3))


def test_evidence_lapses_only_after_both_its_rounds_and_its_swarm_time() -> None:
    """Invalid entries from peer 3: three within the window evict; three spread so that
    each lapses (10 rounds and 100 s of swarm time, from the compute seconds the rounds'
    contributions report) before the next do not."""
    es = engines(4, evidence_window_rounds=10, evidence_window_s=100.0)
    gen = torch.Generator().manual_seed(5)
    bad_rounds = {1, 12, 23}
    for r in range(1, 25):
        entries = []
        for i in range(4):
            if i == 3 and r in bad_rounds:
                entries.append((peer_id(3), b"not a contribution"))
                continue
            u = torch.randn(D, generator=gen)
            payload = es[i].feedback.encode(u).payload
            # each round reports 20 s of compute: 10 rounds = 200 s of swarm time
            entries.append(
                (peer_id(i), encode_contribution(r, es[i].state_digest(), 4, payload, None, 20.0))
            )
        reports = apply_all(es, r, entries)
        if r in bad_rounds:
            assert reports[0].evidence == {peer_id(3): "invalid"}
            assert reports[0].left_out[peer_id(3)].startswith("invalid:")
    assert es[0].swarm_time == pytest.approx(24 * 20.0)
    assert es[0].evidence_count(peer_id(3)) == 1  # only round 23's still counts
    assert es[0].eviction_reason(peer_id(3)) is None or "evidence" not in str(
        es[0].eviction_reason(peer_id(3))
    )
    # the same three within 10 rounds: evicted
    es2 = engines(4, evidence_window_rounds=10, evidence_window_s=100.0)
    for r in range(1, 4):
        entries = [(peer_id(3), b"garbage")]
        for i in range(3):
            payload = es2[i].feedback.encode(torch.randn(D, generator=gen)).payload
            entries.append(
                (peer_id(i), encode_contribution(r, es2[i].state_digest(), 4, payload, None, 20.0))
            )
        apply_all(es2, r, entries)
    assert "3 pieces of evidence" in str(es2[0].eviction_reason(peer_id(3)))


def test_filter_scores_sketches_evidence_and_swarm_time_travel_in_the_state_blob() -> None:
    es = engines(4)
    gen = torch.Generator().manual_seed(11)
    for r in range(1, 4):
        updates = [torch.randn(D, generator=gen) for _ in range(4)]
        entries = [(peer_id(i), es[i].contribution(r, u, 4)) for i, u in enumerate(updates)]
        entries[3] = (peer_id(3), b"junk")
        apply_all(es, r, entries)
    joiner = engines(1)[0]
    joiner.load_state(es[0].state_blob(), es[0].state_digest())
    assert joiner.state_digest() == es[0].state_digest()
    assert joiner.filter_scores == es[0].filter_scores
    assert len(joiner.filter_scores) == 3
    assert joiner.evidence == es[0].evidence
    assert len(joiner.evidence[peer_id(3)]) == 3
    assert joiner.swarm_time == es[0].swarm_time
    assert set(joiner.sketches) == {peer_id(i) for i in range(3)}
    assert joiner.evidence_count(peer_id(3)) == 3


def test_samples_weight_contributions_capped_at_the_median() -> None:
    """Weights are the samples each update covers, capped at the round's median: a peer
    claiming 100x the samples gets the median's weight, a slow peer with a sixth of the
    samples a sixth of it; equal samples give the unweighted rule exactly."""
    es = engines(4)
    gen = torch.Generator().manual_seed(2)
    samples = [48, 48, 8, 4800]
    updates = [torch.randn(D, generator=gen) for _ in range(4)]
    entries = [(peer_id(i), es[i].contribution(1, u, samples[i])) for i, u in enumerate(updates)]
    rep = apply_all(es, 1, entries)[0]
    w = rep.weights
    assert w[peer_id(0)] == pytest.approx(w[peer_id(3)])
    assert w[peer_id(2)] == pytest.approx(w[peer_id(0)] * 8 / 48, rel=1e-5)
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-5)  # rounded to 6 places
    same = engines(2)  # identical samples: no weights, as before the option existed
    decided = [(peer_id(i), same[i].contribution(1, updates[i], 16)) for i in range(2)]
    assert all(e.apply(1, decided).weights == {} for e in same)


def make_swarm(
    data: Path, tmp: Path, n: int, per_peer: dict[int, dict[str, Any]], **sw: Any
) -> LocalSwarm:
    workers = []
    for i in range(n):
        cfg = swarm_config(data, tmp, data_shard=i, **{**sw, **per_peer.get(i, {})})
        workers.append(SwarmWorker(cfg, peer_id(i), out_dir=tmp / f"peer{i}"))
    return LocalSwarm(workers)


def test_a_stale_liar_in_a_training_swarm_is_caught_every_round_and_would_be_voted_out(
    prepared_data: Path, tmp_path: Path, one_thread: None
) -> None:
    """Real workers (trainer, int8 codec with error feedback): the stale_lie peer resends its
    first update with the current digests. Every round after the first it is left out as a
    replay, the honest peers stay identical, and after three rounds every member's verdict
    is eviction for evidence."""
    swarm = make_swarm(prepared_data, tmp_path, 4, {3: {"attack": "stale_lie"}}, rounds=5)
    try:
        liar = peer_id(3)
        for r in range(1, 5):
            reports = swarm.run_round(r)
            rep = reports[peer_id(0)]
            if r == 1:
                assert liar in rep.accepted
                continue
            assert set(rep.replayed) == {liar}, rep.replayed
            assert rep.replayed[liar][1] > 0.99
            assert sorted(rep.accepted) == [peer_id(i) for i in range(3)]
        honest = [swarm.workers[peer_id(i)] for i in range(3)]
        assert len({w.params_sha256() for w in honest}) == 1
        verdicts = {w.engine.eviction_reason(liar) for w in honest}
        assert len(verdicts) == 1
        (why,) = verdicts
        assert why is not None
        assert "evidence" in why
        assert "replay" in why
        assert all(w.engine.eviction_reason(peer_id(i)) is None for w in honest for i in range(3))
    finally:
        swarm.close()


def test_a_slow_peer_covers_fewer_samples_in_the_same_time_and_weighs_less(
    prepared_data: Path, tmp_path: Path, one_thread: None
) -> None:
    """round_pace samples (the default): after round 1 every peer trains for the time the
    median peer needs for inner_steps. A peer slowed 6x then does a fraction of the steps,
    its contribution is accepted, and its weight is its samples' share."""
    swarm = make_swarm(
        prepared_data,
        tmp_path,
        4,
        {3: {"step_slowdown": 6.0}},
        rounds=4,
        inner_steps=12,
        round_pace="samples",
    )
    try:
        slow = peer_id(3)
        for r in range(1, 4):
            rep = swarm.run_round(r)[peer_id(0)]
            assert slow in rep.accepted
            if r == 1:  # no measurement yet: inner_steps each
                assert len({s for s, _ in rep.throughput.values()}) == 1
                continue
            fast = [rep.throughput[peer_id(i)][0] for i in range(3)]
            # how many fewer depends on the machine's timing (benchmarks/swarm.py measures)
            assert rep.throughput[slow][0] < min(fast), rep.throughput
            cap = statistics.median([s for s, _ in rep.throughput.values()])
            ratio = rep.weights[slow] / rep.weights[peer_id(0)]
            assert ratio == pytest.approx(rep.throughput[slow][0] / min(fast[0], cap), rel=1e-4)
    finally:
        swarm.close()


def test_a_partial_contribution_is_weighted_down_but_never_filtered() -> None:
    """A slow peer's few steps (under half the median samples) point about anywhere: here a
    sign flip, every round. The filter neither scores nor leaves it out; its weight, its
    samples' share, bounds what it moves. The same peer claiming full samples is filtered."""
    for claimed, filtered_expected in ((4, False), (48, True)):
        es = engines(5)
        gen = torch.Generator().manual_seed(7)
        ever_filtered = False
        for r in range(1, 7):
            common = torch.randn(D, generator=gen)
            updates = [common + torch.randn(D, generator=gen) for _ in range(4)]
            updates.append(-(common + torch.randn(D, generator=gen)))
            samples = [48, 48, 48, 48, claimed]
            entries = [
                (peer_id(i), es[i].contribution(r, u, samples[i])) for i, u in enumerate(updates)
            ]
            rep = apply_all(es, r, entries)[0]
            ever_filtered |= peer_id(4) in rep.filtered
            if claimed == 4 and peer_id(4) in rep.accepted:  # (outlier flags may exclude it)
                assert rep.weights[peer_id(4)] == pytest.approx(4 / (4 * 48 + 4), rel=1e-4)
        assert ever_filtered is filtered_expected
        assert (peer_id(4) in es[0].filter_scores) is filtered_expected
