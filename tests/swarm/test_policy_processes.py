"""PPO over real peer processes on 127.0.0.1: the rollout records travel with the
contributions through the p2p round protocol, and every peer rejects the forged ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmlm.testing.swarm import SwarmProcesses
from tests.swarm.test_policy_objectives import policy_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_real_peers_reject_a_peer_forging_rewards_and_keep_identical_weights(
    prepared_data: Path, tmp_path: Path, init_lm: Path, reward_ckpt: Path, prompts: Path
) -> None:
    cfg = policy_config(
        prepared_data, tmp_path / "runs", init_lm, reward_ckpt, prompts, "ppo", rounds=3
    )
    raw = cfg.model_dump(mode="json")
    raw["swarm"].update(expect_peers=3, genesis_timeout=120, data_shards=3)
    raw["p2p"].update(
        round_timeout=5.0,
        proposal_grace=0.1,
        heartbeat_interval=0.5,
        dead_timeout=10.0,
        pex_interval=1.0,
        fetch_timeout=10.0,
    )
    config = tmp_path / "ppo.json"
    config.write_text(json.dumps(raw), encoding="utf-8")
    overrides = {i: [f"swarm.data_shard={i}"] for i in range(3)}
    overrides[2].append("swarm.attack=fabricate")
    with SwarmProcesses(config, 3, tmp_path, overrides=overrides) as swarm:
        genesis = swarm.wait_all("genesis", 150)
        swarm.wait_all("done", 240)
        rounds = {p.index: p.rounds() for p in swarm.peers}
        ids = [p.id for p in swarm.peers]
    liar = ids[2]
    assert all(sorted(r) == [1, 2, 3] for r in rounds.values())
    assert len(genesis) == 3
    ready = [next(ev for ev in p.history if ev["event"] == "ready") for p in swarm.peers]
    assert [ev["objective"] for ev in ready] == ["ppo"] * 3
    for r in (1, 2, 3):
        events = [rounds[i][r] for i in range(3)]
        assert len({ev["params_sha256"] for ev in events}) == 1, f"round {r}"
        for ev in events:
            assert ev["accepted"] == 2
            assert list(ev["rejected"]) == [liar]
            assert "reward claimed" in ev["rejected"][liar]["reason"]
            assert ev["verified"] == {} or ev["verified"][liar[:12]] == 0
    log = (tmp_path / "peer0" / "swarm_rounds.jsonl").read_text().splitlines()
    assert json.loads(log[0])["rejected"][liar]["payload_sha256"]
