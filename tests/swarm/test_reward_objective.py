"""A reward model trained over the swarm: simulated peers hold identical weights, learn the
held-out preferences, report calibration, and can take their pairs from the curation
store's consensus labels (an annotator who flips every label is outvoted)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from swarmlm.rlhf.modeling import load_reward_model
from swarmlm.rlhf.swarm_objectives import RewardObjective
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker
from tests.rlhf.conftest import BAD, GOOD
from tests.swarm.conftest import peer_id, swarm_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]


def reward_config(data: Path, tmp: Path, init_lm: Path, **reward: Any) -> SwarmRunConfig:
    sw: dict[str, Any] = {
        "objective": "reward",
        "reward": {"init_checkpoint": str(init_lm), "batch_size": 8, "val_fraction": 0.2, **reward},
        "rounds": 4,
        "inner_steps": 5,
        "data_shards": 4,
    }
    raw = swarm_config(data, tmp, **sw).model_dump(mode="json")
    raw["optim"].update(lr=1e-3, weight_decay=0.0)
    return SwarmRunConfig.model_validate(raw)


def make_swarm(data: Path, tmp: Path, init_lm: Path, n: int = 4, **reward: Any) -> LocalSwarm:
    workers = []
    for i in range(n):
        raw = reward_config(data, tmp, init_lm, **reward).model_dump(mode="json")
        raw["swarm"].update(data_shard=i, data_shards=n)
        cfg = SwarmRunConfig.model_validate(raw)
        workers.append(SwarmWorker(cfg, peer_id(i), out_dir=tmp / f"peer{i}"))
    return LocalSwarm(workers)


def test_reward_model_peers_agree_and_learn_the_held_out_preferences(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    swarm = make_swarm(prepared_data, tmp_path, init_lm, preferences=str(preferences))
    workers = list(swarm.workers.values())
    try:
        assert len({w.params_sha256() for w in workers}) == 1  # same transformer and head
        assert workers[0].layout.numel > sum(
            p.numel() for p in workers[0].trainer.model_core.parameters()
        )  # the head is part of the agreed state
        workers[0].evaluate()
        start = workers[0].eval_metrics
        for r in range(1, 5):
            swarm.run_round(r)
            assert len({w.params_sha256() for w in workers}) == 1, f"round {r}: peers diverged"
        ends = []
        for w in workers:
            w.evaluate()
            ends.append(w.eval_metrics)
        objective = workers[0].objective
        assert isinstance(objective, RewardObjective)
        path = objective.export(tmp_path / "rm", objective_init(workers[0]))
    finally:
        swarm.close()
    print(f"held-out reward model: start {start}, end {ends[0]}")
    assert all(e == ends[0] for e in ends)  # identical weights, identical held-out pairs
    assert ends[0]["accuracy"] >= 0.95 > start["accuracy"]
    assert ends[0]["loss"] < start["loss"] - 0.3
    assert 0.0 <= ends[0]["calibration_error"] < 0.3
    rm, _ = load_reward_model(path)  # what rlhf ppo and the ppo/grpo objectives load
    assert float(rm.reward_std) > 0


def objective_init(worker: SwarmWorker) -> Any:
    from swarmlm.rlhf.swarm_objectives import read_init_checkpoint

    section = worker.cfg.swarm.section()
    return read_init_checkpoint(section.init_checkpoint)  # type: ignore[union-attr]


def poisoned_store(tmp: Path, n_tasks: int, seed: int) -> tuple[str, int, dict[str, str]]:
    """A pairwise task set labelled by three annotators, one of whom flips every label;
    returns the URL, the task set id and each prompt's truly preferred output."""
    from argon2 import PasswordHasher

    from swarmlm.curation.store import CurationStore, TaskInput
    from swarmlm.p2p.identity import NodeIdentity

    url = f"sqlite:///{tmp / 'curation.db'}"
    store = CurationStore.open(
        url,
        NodeIdentity.generate(),
        rng=random.Random(seed),
        password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
    )
    rng = random.Random(seed)
    truth: dict[str, str] = {}
    tasks = []
    for i in range(n_tasks):
        prompt = f"{i} " + " ".join(rng.choice(["the", "lord", "and", "they"]) for _ in range(3))
        good = " ".join(rng.choice([*GOOD, "the", "of"]) for _ in range(3)) + " " + rng.choice(GOOD)
        bad = " ".join(rng.choice([*BAD, "the", "of"]) for _ in range(3)) + " " + rng.choice(BAD)
        outputs = [good, bad] if rng.random() < 0.5 else [bad, good]
        truth[prompt] = good
        tasks.append(TaskInput(content={"prompt": prompt}, outputs=outputs))
    ts = store.create_task_set("pw", {"kind": "pairwise"}, k=3, gold_share=0.0)
    store.add_tasks(ts.id, tasks)
    for a in range(3):
        uid = store.create_annotator(f"rater{a}", "long enough").id
        while (lt := store.next_task(uid, ts.id)) is not None:
            good_is_a = lt.outputs[0] in truth.values()
            honest = "A" if good_is_a else "B"
            flipped = "B" if good_is_a else "A"
            store.submit(uid, lt.task_id, flipped if a == 2 else honest, 5)
    store.close()
    return url, ts.id, truth


def test_reward_model_trains_on_the_stores_consensus_despite_a_label_flipper(
    prepared_data: Path, tmp_path: Path, init_lm: Path
) -> None:
    url, task_set, truth = poisoned_store(tmp_path, 100, seed=3)
    cache = tmp_path / "consensus.jsonl"
    swarm = make_swarm(
        prepared_data,
        tmp_path,
        init_lm,
        n=2,
        curation_db=url,
        task_set=task_set,
        preferences_cache=str(cache),
    )
    workers = list(swarm.workers.values())
    try:
        rows = [json.loads(line) for line in cache.read_text().splitlines()]
        for r in range(1, 4):
            swarm.run_round(r)
        workers[0].evaluate()
        end = workers[0].eval_metrics
    finally:
        swarm.close()
    assert len(rows) == 100
    # the flipper is outvoted 2:1 on every task: every consensus pair is truly ordered
    assert all(row["chosen"] == truth[row["prompt"]] for row in rows)
    assert end["accuracy"] >= 0.9, end


def test_reward_sections_are_checked_naming_the_field(
    prepared_data: Path, tmp_path: Path, init_lm: Path, preferences: Path
) -> None:
    with pytest.raises(ValueError, match="exactly one of preferences and curation_db"):
        reward_config(prepared_data, tmp_path, init_lm)
    with pytest.raises(ValueError, match="curation_db needs task_set"):
        reward_config(prepared_data, tmp_path, init_lm, curation_db="sqlite:///x.db")
    with pytest.raises(ValueError, match=r"swarm.reward.batch_size"):
        reward_config(prepared_data, tmp_path, init_lm, preferences="p", batch_size=0)
    url, task_set, _ = poisoned_store(tmp_path, 0, seed=1)
    cfg = reward_config(
        prepared_data,
        tmp_path,
        init_lm,
        curation_db=url,
        task_set=task_set,
        preferences_cache=str(tmp_path / "c.jsonl"),
    )
    with pytest.raises(SwarmError, match="no finalised preference yet; the reward model waits"):
        SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "peer")
