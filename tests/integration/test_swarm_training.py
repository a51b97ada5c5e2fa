"""Real swarm peers as processes on 127.0.0.1 (``swarmlm.testing.swarm``): they train the
tiny model together over the p2p round protocol."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from swarmlm.testing.swarm import SwarmProcesses

pytestmark = pytest.mark.integration


def write_config(data: Path, out: Path, path: Path, **swarm: Any) -> Path:
    """The tiny config of configs/swarm-tiny.json, shrunk further for a quick test."""
    cfg = {
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"path": str(data), "batch_size": 4, "seq_len": 32, "prefetch": 2},
        "optim": {"lr": 0.003},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {"eval_batches": 8, "out_dir": str(out), "seed": 0, "threads": 1},
        "swarm": {"rounds": 4, "inner_steps": 10, "data_shards": 16, "expect_peers": 3,
                  "genesis_timeout": 120, **swarm},
        "p2p": {"round_timeout": 2.0, "proposal_grace": 0.1, "heartbeat_interval": 0.5,
                "dead_timeout": 3.0, "pex_interval": 1.0, "fetch_timeout": 5.0},
    }  # fmt: skip
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def assert_identical_rounds(rounds: dict[int, dict[int, dict[str, Any]]], upto: int) -> None:
    for r in range(1, upto + 1):
        hashes = {idx: per_peer[r]["params_sha256"] for idx, per_peer in rounds.items()}
        assert len(set(hashes.values())) == 1, f"round {r}: parameter hashes differ {hashes}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_three_peers_learn_with_identical_weights_after_every_round(
    prepared_data: Path, tmp_path: Path, overlap: bool
) -> None:
    config = write_config(
        prepared_data, tmp_path / "runs", tmp_path / "swarm.json", overlap=overlap
    )
    # fixed data shards: the run does not depend on the random node ids
    shards = {i: [f"swarm.data_shard={i}"] for i in range(3)}
    with SwarmProcesses(config, 3, tmp_path, overrides=shards) as swarm:
        genesis = swarm.wait_all("genesis", 120)
        swarm.wait_all("done", 150)
        rounds = {p.index: p.rounds() for p in swarm.peers}
    assert all(len(g["members"]) == 3 for g in genesis)
    assert all(sorted(r) == [1, 2, 3, 4] for r in rounds.values())
    assert_identical_rounds(rounds, 4)
    first, last = genesis[0]["val_loss"], rounds[0][4]["val_loss"]
    # one-round-delayed updates start slower (rounds 1 and 2 both start from the genesis)
    assert last < first - (0.1 if overlap else 0.5), (first, last)
    assert all(ev["accepted"] == 3 for per_peer in rounds.values() for ev in per_peer.values())
    log = (tmp_path / "peer1" / "swarm_rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in log] == [1, 2, 3, 4]


@pytest.mark.timeout(300)
def test_training_continues_with_identical_weights_after_a_peer_is_sigkilled(
    prepared_data: Path, tmp_path: Path
) -> None:
    config = write_config(
        prepared_data, tmp_path / "runs", tmp_path / "swarm.json", rounds=6, expect_peers=4
    )
    with SwarmProcesses(config, 4, tmp_path) as swarm:
        swarm.wait_all("genesis", 150)
        victim = swarm.peers[3]
        while 2 not in victim.rounds():
            victim.wait("round", 120)
        victim.kill()
        survivors = swarm.peers[:3]
        for p in survivors:
            p.wait("done", 180)
        rounds = {p.index: p.rounds() for p in survivors}
    assert all(sorted(r) == [1, 2, 3, 4, 5, 6] for r in rounds.values())
    assert_identical_rounds(rounds, 6)
    assert rounds[0][6]["accepted"] == 3  # the dead peer no longer contributes
    assert rounds[0][6]["val_loss"] < rounds[0][2]["val_loss"]


@pytest.mark.timeout(300)
def test_a_new_peer_joins_mid_training_with_identical_weights_before_contributing(
    prepared_data: Path, tmp_path: Path
) -> None:
    # open-ended run (rounds take ~1 s; a peer needs ~10 s to start): stopped once the
    # joiner has contributed to a few rounds
    config = write_config(
        prepared_data, tmp_path / "runs", tmp_path / "swarm.json",
        rounds=10_000, expect_peers=3, exclude_below=0.0,  # (see the restart test)
    )  # fmt: skip
    with SwarmProcesses(config, 3, tmp_path) as swarm:
        swarm.wait_all("genesis", 150)
        swarm.peers[0].wait("round", 120)
        joiner = swarm.add_peer()
        genesis = joiner.wait("genesis", 120)
        contributed: list[int] = []
        while len(contributed) < 3:
            ev = joiner.wait("round", 120)
            if not ev["caught_up"]:
                contributed.append(ev["round"])
        for p in reversed(swarm.peers):  # the joiner first: the others have all its rounds
            p.stop()
        rounds = {p.index: p.rounds() for p in swarm.peers}
    assert genesis["round"] >= 1
    assert joiner.id not in genesis["members"]
    mine = rounds[3]
    assert min(mine) > genesis["round"]  # (rounds it could not sync from are skipped)
    both = [r for r in mine if r in rounds[0]]  # (a stopped peer may miss the last one)
    assert len(both) >= len(mine) - 1
    for r in both:
        assert mine[r]["params_sha256"] == rounds[0][r]["params_sha256"], f"round {r}"
    first = contributed[0]
    assert first - 1 in mine  # it applied a round, identical to the others', before that
    assert any(rounds[0][r]["accepted"] == 4 for r in contributed if r in rounds[0])


@pytest.mark.timeout(360)
def test_a_peer_restarted_from_its_checkpoint_catches_up_to_identical_weights(
    prepared_data: Path, tmp_path: Path
) -> None:
    config = write_config(
        prepared_data, tmp_path / "runs", tmp_path / "swarm.json",
        rounds=14, inner_steps=30, expect_peers=4, checkpoint_every=1,
        exclude_below=0.0,  # honest peers on other data get outlier flags at n = 4
    )  # fmt: skip
    with SwarmProcesses(config, 4, tmp_path) as swarm:
        swarm.wait_all("genesis", 150)
        victim = swarm.peers[3]
        while 3 not in victim.rounds():
            victim.wait("round", 120)
        victim.kill()
        back = swarm.restart(3)
        genesis = back.wait("genesis", 120)
        back.wait("done", 240)
        for p in swarm.peers[:3]:
            p.wait("done", 120)
        rounds = {p.index: p.rounds() for p in swarm.peers}
    assert genesis["round"] >= 3  # resumed from its checkpoint, not from scratch
    resumed = sorted(rounds[3])
    assert resumed == list(range(genesis["round"] + 1, 15))
    for r in resumed:
        assert rounds[3][r]["params_sha256"] == rounds[0][r]["params_sha256"], f"round {r}"
    # once caught up it contributes again (a single round may miss it if it is late)
    assert any(rounds[0][r]["accepted"] == 4 for r in range(11, 15))


@pytest.mark.timeout(120)
def test_sigterm_stops_a_training_peer_cleanly(prepared_data: Path, tmp_path: Path) -> None:
    config = write_config(
        prepared_data, tmp_path / "runs", tmp_path / "swarm.json", rounds=500, expect_peers=1
    )
    with SwarmProcesses(config, 1, tmp_path) as swarm:
        peer = swarm.peers[0]
        peer.wait("round", 90)
        peer.proc.send_signal(signal.SIGTERM)
        done = peer.wait("done", 30)
        assert peer.proc.wait(timeout=30) == 0
    assert 1 <= done["rounds"] < 500
    assert "Traceback" not in peer.log_tail(200)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_honest_peers_stay_within_5_percent_of_the_clean_run_under_attack(
    prepared_data: Path, tmp_path: Path
) -> None:
    """Peer 0 of 4 attacks (sign flip x10, then ALIE); peers keep fixed data shards, so the
    runs see the same batches and differ only by the attack."""
    final = {}
    for attack in ("none", "sign_flip", "alie"):
        root = tmp_path / attack
        root.mkdir()
        config = write_config(
            prepared_data, root / "runs", root / "swarm.json",
            rounds=6, expect_peers=4, attack_scale=10.0,
        )  # fmt: skip
        sets = {i: [f"swarm.data_shard={i}"] for i in range(4)}
        sets[0].append(f"swarm.attack={attack}")
        if attack == "sign_flip":  # reputation-driven eviction, opt-in
            for i in range(4):
                sets[i].append("swarm.evict_below=0.3")
        with SwarmProcesses(config, 4, root, overrides=sets) as swarm:
            if attack == "sign_flip":
                # the flipper is voted out on reputation and its process exits 1 saying so
                # (an evicted peer never reports 'done')
                attacker = swarm.peers[0]
                evicted = attacker.wait("evicted", 240)
                attacker.proc.wait(timeout=60)
                assert attacker.proc.returncode == 1
                assert "reputation" in evicted["reason"], evicted
            honest = [p for p in swarm.peers if p.index != 0 or attack != "sign_flip"]
            for p in honest:
                p.wait("done", 240)
            rounds = {p.index: p.rounds() for p in swarm.peers}
        assert_identical_rounds({i: rounds[i] for i in (1, 2, 3)}, 6)
        final[attack] = rounds[1][6]["val_loss"]
        members = [rounds[1][r]["members_next"] for r in range(1, 7)]
        if attack == "sign_flip":  # flagged from round 2: 0.7^4 < 0.3, voted out by round 6
            assert members[-1] == 3, members
    assert final["sign_flip"] <= final["none"] * 1.05, final
    assert final["alie"] <= final["none"] * 1.05, final
