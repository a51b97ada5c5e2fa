"""Real peer processes on 127.0.0.1 (issue 19 items 4 and 5): a peer that keeps sending
its first update stamped as fresh (stale_lie) is voted out on evidence and its process
exits non-zero saying why; a peer six times slower than the others contributes, weighted by
the samples it covered, and every round report says who was left out and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.testing.swarm import SwarmProcesses
from tests.swarm.conftest import swarm_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ROUNDS = 9


def test_a_stale_liar_is_evicted_and_exits_saying_why_while_a_slow_peer_keeps_contributing(
    prepared_data: Path, tmp_path: Path
) -> None:
    raw = swarm_config(
        prepared_data,
        tmp_path / "runs",
        rounds=ROUNDS,
        inner_steps=10,
        expect_peers=5,
        round_pace="samples",
    ).model_dump(mode="json")
    raw["swarm"].update(genesis_timeout=150, checkpoint_every=100)
    raw["p2p"].update(
        round_timeout=30.0,  # above a loaded local phase: no view change per round
        proposal_grace=0.3,
        heartbeat_interval=0.5,
        dead_timeout=5.0,
        pex_interval=1.0,
        fetch_timeout=5.0,
    )
    config = tmp_path / "swarm.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    overrides = {i: [f"swarm.data_shard={i}"] for i in range(5)}
    overrides[3].append("swarm.step_slowdown=6")
    overrides[4].append("swarm.attack=stale_lie")
    with SwarmProcesses(config, 5, tmp_path, overrides=overrides) as swarm:
        swarm.wait_all("genesis", 180)
        liar, slow = swarm.peers[4], swarm.peers[3]
        evicted = liar.wait("evicted", 300)
        liar.proc.wait(timeout=60)
        for p in swarm.peers[:4]:
            p.wait("done", 300)
        liar_output = " ".join(liar.other_output) + liar.log_tail(60)
        rounds = {p.index: p.rounds() for p in swarm.peers[:4]}
        liar_id, slow_id = liar.id[:12], slow.id[:12]
    # the liar: removed on evidence, exit code 1, the reason printed
    assert liar.proc.returncode == 1, liar_output
    assert "evidence" in evicted["reason"], evicted
    assert "replay" in evicted["reason"], evicted
    assert "evicted from the swarm" in liar_output
    last = rounds[0][ROUNDS]
    assert last["members_next"] == 4
    replayed = [r for r, ev in rounds[0].items() if liar_id in ev["replayed"]]
    assert replayed, "the liar's replays were never recognised"
    assert all(rounds[0][r]["left_out"][liar_id].startswith("stale: repeats") for r in replayed)
    # honest peers (the slow one included) stay bit-identical
    for r in range(1, ROUNDS + 1):
        hashes = {i: per[r]["params_sha256"] for i, per in rounds.items() if r in per}
        assert len(set(hashes.values())) == 1, f"round {r}: {hashes}"
    # the slow peer contributes in most rounds (not round 1: no rates measured yet), with
    # fewer samples than the fast peers and a matching weight
    report = rounds[0]
    joined = [r for r in range(2, ROUNDS + 1) if slow_id in report[r]["samples"]]
    assert len(joined) >= (ROUNDS - 1) // 2 + 1, {r: report[r]["left_out"] for r in report}
    fewer = [
        r
        for r in joined
        if report[r]["samples"][slow_id]
        < report[r]["samples"][rounds_fast(report[r], slow_id, liar_id)]
    ]
    assert fewer, "the slow peer never covered fewer samples than a fast one"
    for r in fewer:
        assert report[r]["weights"][slow_id] < max(report[r]["weights"].values())
    # who was left out and why is in swarm_rounds.jsonl
    lines = [
        json.loads(x) for x in (tmp_path / "peer0" / "swarm_rounds.jsonl").read_text().splitlines()
    ]
    assert all("left_out" in ev and "weights" in ev for ev in lines)


def rounds_fast(event: dict[str, object], *others: str) -> str:
    """A fast honest contributor of the round (not the slow peer, not the liar)."""
    samples = event["samples"]
    assert isinstance(samples, dict)
    return next(p for p in sorted(samples) if p not in others)
