"""DPO as a swarm objective: simulated peers align one model on sharded preference pairs,
hold identical weights after every round, and report the same held-out DPO numbers."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmlm.rlhf.swarm_objectives import DPOObjective
from swarmlm.swarm.config import SwarmRunConfig, load_swarm_config
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker
from swarmlm.train.checkpoint import load_checkpoint
from tests.swarm.conftest import peer_id, swarm_config

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_config(data: Path, tmp: Path) -> SwarmRunConfig:
    return swarm_config(data, tmp)


def dpo_config(
    data: Path, tmp: Path, init_lm: Path, preferences: Path, **swarm: Any
) -> SwarmRunConfig:
    """4 rounds of 4 DPO steps (8 pairs each) at lr 3e-4: slow enough that the held-out
    loss falls over several rounds instead of collapsing in the first."""
    dpo = {
        "preferences": str(preferences),
        "init_checkpoint": str(init_lm),
        "batch_size": 8,
        "val_fraction": 0.2,
        **swarm.pop("dpo", {}),
    }
    sw: dict[str, Any] = {
        "objective": "dpo",
        "dpo": dpo,
        "rounds": 4,
        "inner_steps": 4,
        "data_shards": 4,
        **swarm,
    }
    raw = swarm_config(data, tmp, **sw).model_dump(mode="json")
    raw["optim"]["lr"] = 3e-4
    return SwarmRunConfig.model_validate(raw)


def make_dpo_swarm(
    data: Path, tmp: Path, init_lm: Path, preferences: Path, n: int = 4, **swarm: Any
) -> LocalSwarm:
    workers = []
    for i in range(n):
        cfg = dpo_config(data, tmp, init_lm, preferences, data_shard=i, data_shards=n, **swarm)
        workers.append(SwarmWorker(cfg, peer_id(i), out_dir=tmp / f"peer{i}"))
    return LocalSwarm(workers)


def test_dpo_peers_hold_identical_weights_and_learn_the_held_out_preferences(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    swarm = make_dpo_swarm(prepared_data, tmp_path, init_lm, preferences)
    workers = list(swarm.workers.values())
    try:
        # every peer loaded the same file, so genesis is one state, not train.seed's init
        assert len({w.params_sha256() for w in workers}) == 1
        start = [w.evaluate() for w in workers]
        start_acc = workers[0].eval_metrics["reward_accuracy"]
        history = [start[0]]
        accuracy = [start_acc]
        for r in range(1, 5):
            swarm.run_round(r)
            assert len({w.params_sha256() for w in workers}) == 1, f"round {r}: peers diverged"
            assert len({w.engine.state_digest() for w in workers}) == 1
            history.append(workers[0].evaluate())
            accuracy.append(workers[0].eval_metrics["reward_accuracy"])
        end = [w.evaluate() for w in workers]
        end_metrics = workers[0].eval_metrics
    finally:
        swarm.close()
    # the policy starts as its own reference: every implicit reward is 0 and the loss log 2
    assert start == [pytest.approx(math.log(2), abs=1e-6)] * 4
    assert len(set(end)) == 1, end  # the same held-out pairs and reference on every peer
    print(f"held-out DPO loss by round {history}, reward accuracy {accuracy}")
    assert all(b < a for a, b in itertools.pairwise(history)), history
    assert history[-1] < math.log(2) - 0.2, history
    # at the reference every implicit reward ties at 0, which counts as not preferred
    assert start_acc == 0.0
    assert end_metrics["reward_accuracy"] >= 0.9, (accuracy, end_metrics)
    assert end_metrics["reward_margin"] > 0


def test_synchronous_dpo_rounds_take_one_gradient_per_peer_and_agree(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    swarm = make_dpo_swarm(prepared_data, tmp_path, init_lm, preferences, n=3, mode="synchronous")
    workers = list(swarm.workers.values())
    try:
        before = workers[0].evaluate()
        for r in range(1, 7):
            swarm.run_round(r)
            assert len({w.params_sha256() for w in workers}) == 1, f"round {r}: peers diverged"
        after = workers[0].evaluate()
        steps = [w.trainer.step for w in workers]
    finally:
        swarm.close()
    assert steps == [6, 6, 6]
    assert after < before - 0.01, (before, after)


def test_each_peer_trains_on_its_own_disjoint_shard_of_pairs(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    swarm = make_dpo_swarm(prepared_data, tmp_path, init_lm, preferences, n=3)
    try:
        objectives = [w.objective for w in swarm.workers.values()]
        assert all(isinstance(o, DPOObjective) for o in objectives)
        shards = [o.train for o in objectives if isinstance(o, DPOObjective)]
        held = [o.held_out for o in objectives if isinstance(o, DPOObjective)]
    finally:
        swarm.close()
    assert [len(s) for s in shards] == [64, 64, 64]  # 240 pairs, 48 held out, i % 3
    lines = preferences.read_text().splitlines()
    assert len(set(lines)) == len(lines)  # so equal token rows would mean a shared pair
    rows = [
        {tuple(c + r) for c, r in zip(s.chosen_ids.tolist(), s.rejected_ids.tolist(), strict=True)}
        for s in shards
    ]
    assert [len(r) for r in rows] == [64, 64, 64]
    assert not rows[0] & rows[1]
    assert not rows[0] & rows[2]
    assert not rows[1] & rows[2]
    assert all(torch.equal(h.chosen_ids, held[0].chosen_ids) for h in held)


def test_a_restarted_dpo_peer_continues_bit_for_bit(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    """Restored from its checkpoint, a peer recomputes the reference from the initial weights
    and continues the batch order at its step: the swarm ends where an uninterrupted one does.
    (Codec "none": a compressing codec's error-feedback residual is not checkpointed.)"""
    straight = make_dpo_swarm(
        prepared_data, tmp_path / "straight", init_lm, preferences, n=2, codec="none"
    )
    try:
        straight.run_round(1)
        straight.run_round(2)
        expected = straight.workers[peer_id(0)].params_sha256()
    finally:
        straight.close()
    swarm = make_dpo_swarm(
        prepared_data, tmp_path / "restart", init_lm, preferences, n=2, codec="none"
    )
    try:
        swarm.run_round(1)
        old = swarm.workers[peer_id(1)]
        old.save_checkpoint(sorted(swarm.workers))
        old.close()
        cfg = dpo_config(
            prepared_data,
            tmp_path / "restart",
            init_lm,
            preferences,
            data_shard=1,
            data_shards=2,
            codec="none",
        )
        new = SwarmWorker(cfg, peer_id(1), out_dir=tmp_path / "restart" / "peer1")
        assert new.resume_latest() == (1, sorted(swarm.workers))
        swarm.workers[peer_id(1)] = new
        swarm.run_round(2)
        hashes = {w.params_sha256() for w in swarm.workers.values()}
        assert new.trainer.step == 8
    finally:
        swarm.close()
    assert swarm.resyncs == dict.fromkeys(swarm.workers, 0)
    assert hashes == {expected}


def write_config(path: Path, cfg: SwarmRunConfig, **dpo: Any) -> Path:
    raw = cfg.model_dump(mode="json")
    assert raw["swarm"]["dpo"] is not None
    raw["swarm"]["dpo"].update(dpo)
    path.write_text(json.dumps(raw))
    return path


def test_objective_dpo_without_its_section_is_refused_naming_the_field(
    prepared_data: Path, tmp_path: Path
) -> None:
    raw = base_config(prepared_data, tmp_path).model_dump(mode="json")
    raw["swarm"]["objective"] = "dpo"
    path = tmp_path / "swarm.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SwarmError, match=r"swarm.dpo section"):
        load_swarm_config(path)
    raw["swarm"]["objective"] = "lm"
    raw["swarm"]["dpo"] = {"preferences": "p.jsonl", "init_checkpoint": "ckpt"}
    path.write_text(json.dumps(raw))
    with pytest.raises(SwarmError, match=r'swarm.objective is "lm"'):
        load_swarm_config(path)


def test_bad_dpo_inputs_are_named_before_any_training(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    def build(**kw: Any) -> None:
        kw.setdefault("data_shard", 0)
        cfg = dpo_config(prepared_data, tmp_path, init_lm, preferences, **kw)
        SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "peer")

    with pytest.raises(SwarmError, match=r"swarm.dpo.preferences: .*missing.jsonl does not"):
        build(dpo={"preferences": str(tmp_path / "missing.jsonl")})

    broken = tmp_path / "broken"
    (broken / "checkpoints" / "step-00000001").mkdir(parents=True)
    (broken / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(SwarmError, match=r"swarm.dpo.init_checkpoint: cannot read"):
        build(dpo={"init_checkpoint": str(broken)})
    with pytest.raises(SwarmError, match=r"swarm.dpo.init_checkpoint: .*nowhere does not"):
        build(dpo={"init_checkpoint": str(tmp_path / "nowhere")})

    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 1\n')
    with pytest.raises(SwarmError, match=r"swarm.dpo.preferences: .*bad.jsonl.* line 2"):
        build(dpo={"preferences": str(bad_line)})

    with pytest.raises(SwarmError, match=r"shard 499 of swarm.data_shards=500 holds no"):
        build(data_shards=500, data_shard=499)
    with pytest.raises(SwarmError, match=r"no held-out pairs"):
        build(dpo={"val_fraction": 0.0})


def test_a_model_section_that_differs_from_the_checkpoint_is_refused(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    raw = dpo_config(prepared_data, tmp_path, init_lm, preferences, data_shard=0).model_dump(
        mode="json"
    )
    raw["model"]["d_model"] = 32
    cfg = SwarmRunConfig.model_validate(raw)
    with pytest.raises(SwarmError, match=r"model.d_model=32 \(checkpoint: 64\)"):
        SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "peer")
    # without a model section the checkpoint's shape is used
    del raw["model"]
    cfg = SwarmRunConfig.model_validate(raw)
    worker = SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "peer")
    try:
        assert worker.model.cfg.d_model == 64
        initial = load_checkpoint(init_lm).model_state
        assert all(torch.equal(v, initial[k]) for k, v in worker.model.state_dict().items())
    finally:
        worker.close()
