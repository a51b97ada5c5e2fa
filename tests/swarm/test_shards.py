"""Data shards handed out over the round's membership (swarm.shard_policy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.swarm.shards import plan_shards, shard_for_round
from swarmlm.swarm.worker import shard_for

MEMBERS = [f"{i:064x}" for i in range(5)]


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "performance"])
def test_every_shard_has_one_owner_and_no_two_members_share_one(policy: str) -> None:
    plan = plan_shards(MEMBERS, 16, policy)  # type: ignore[arg-type]
    owned = [s for shards in plan.values() for s in shards]
    assert sorted(owned) == list(range(16))
    assert all(plan[m] for m in MEMBERS)  # everyone reads a shard of its own
    # in any round, the shards read are distinct
    for r in range(6):
        read = [shard_for_round(plan[m], r, -1) for m in MEMBERS]
        assert len(set(read)) == len(read)


def test_two_peers_whose_ids_hash_to_one_shard_read_different_shards_under_a_plan() -> None:
    """The case the policies exist for (10 peers over 64 shards collide by hash about half
    the time): two ids that hash to the same shard get distinct ones from the plan."""
    seen: dict[int, str] = {}
    for i in range(1000):
        peer = f"peer-{i}"
        shard = shard_for(peer, 64)
        if shard in seen:
            pair = [seen[shard], peer]
            break
        seen[shard] = peer
    assert shard_for(pair[0], 64) == shard_for(pair[1], 64)
    plan = plan_shards(pair, 64, "round_robin")
    assert shard_for_round(plan[pair[0]], 1, -1) != shard_for_round(plan[pair[1]], 1, -1)


def test_performance_gives_faster_members_more_shards_and_follows_the_decided_rates() -> None:
    fast, slow = MEMBERS[0], MEMBERS[4]
    rates = {m: (100, 1.0) for m in MEMBERS}
    rates[slow] = (10, 1.0)
    plan = plan_shards(MEMBERS, 40, "performance", rates)
    assert len(plan[fast]) > len(plan[slow]) >= 1
    assert plan == plan_shards(list(reversed(MEMBERS)), 40, "performance", dict(rates))
    # without measurements it is an even split
    even = plan_shards(MEMBERS, 40, "performance")
    assert {len(v) for v in even.values()} == {8}


def test_more_members_than_shards_fall_back_to_their_hashed_shard() -> None:
    plan = plan_shards(MEMBERS, 3, "round_robin")
    assert [len(plan[m]) for m in MEMBERS] == [1, 1, 1, 0, 0]
    assert shard_for_round(plan[MEMBERS[4]], 7, fallback=2) == 2


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="hash policy has no plan"):
        plan_shards(MEMBERS, 4, "hash")
    with pytest.raises(ValueError, match="data_shards"):
        plan_shards(MEMBERS, 0, "round_robin")


def test_a_pinned_shard_and_a_balanced_policy_are_refused_together(tmp_path: Path) -> None:
    from tests.swarm.conftest import swarm_config

    with pytest.raises(ValueError, match="shard_policy"):
        swarm_config(tmp_path, tmp_path, data_shard=1, shard_policy="round_robin")


def test_workers_move_to_the_planned_shards_after_a_round(
    prepared_data: Path, tmp_path: Path
) -> None:
    from swarmlm.swarm.simulate import LocalSwarm
    from swarmlm.swarm.worker import SwarmWorker
    from tests.swarm.conftest import peer_id, swarm_config

    before = torch.get_num_threads()
    workers = []
    for i in range(3):
        cfg = swarm_config(
            prepared_data, tmp_path, shard_policy="round_robin", inner_steps=2, data_shards=16
        )
        workers.append(SwarmWorker(cfg, peer_id(i), out_dir=tmp_path / f"peer{i}"))
    swarm = LocalSwarm(workers)
    try:
        swarm.run_round(1)
        plan = plan_shards([w.node_id for w in workers], 16, "round_robin")
        for w in workers:
            assert w.shard == shard_for_round(plan[w.node_id], 2, w.hashed_shard)
            assert w.trainer.loader.rank == w.shard
        assert len({w.shard for w in workers}) == 3
        swarm.run_round(2)  # and training goes on from the new shards
        assert len({w.params_sha256() for w in workers}) == 1
    finally:
        swarm.close()
        torch.set_num_threads(before)
