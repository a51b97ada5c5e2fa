"""PPO and GRPO over the swarm: peers optimise the agreed policy against the agreed reward
model, verify each other's rollouts by recomputing a sample drawn from the decided round,
and reject and charge a peer that forges rollouts, log-probs or rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from swarmlm.rlhf.rollouts import RolloutRecord, miss_probability, sample_indices
from swarmlm.rlhf.swarm_policy import PolicyObjective
from swarmlm.swarm.config import SwarmRunConfig
from swarmlm.swarm.errors import SwarmError
from swarmlm.swarm.simulate import LocalSwarm
from swarmlm.swarm.worker import SwarmWorker
from tests.swarm.conftest import peer_id, swarm_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

ROUNDS = 6


def policy_config(
    data: Path, tmp: Path, init_lm: Path, reward_ckpt: Path, prompts: Path, algo: str, **kw: Any
) -> SwarmRunConfig:
    section = {
        "init_checkpoint": str(init_lm),
        "reward_checkpoint": str(reward_ckpt),
        "prompts_file": str(prompts),
        "prompts_per_round": 8,
        "minibatch_size": 8,
        "max_new_tokens": 8,
        "eval_prompts": 16,
        "verify_sample": 2,
        "kl_coef": 0.02,
        **kw.pop(algo, {}),
    }
    if algo == "grpo":  # 4 prompts x 2 responses: as many rollouts as PPO's 8
        section.setdefault("group_size", 2)
        section["prompts_per_round"] = 4
    sw: dict[str, Any] = {
        "objective": algo,
        algo: section,
        "rounds": ROUNDS,
        "inner_steps": 4,
        "data_shards": 4,
        "outer_lr": 1.0,
        "outer_momentum": 0.0,
        **kw,
    }
    raw = swarm_config(data, tmp, **sw).model_dump(mode="json")
    raw["optim"].update(lr=3e-2, weight_decay=0.0)  # a tiny random policy: big steps
    return SwarmRunConfig.model_validate(raw)


def make_swarm(n: int, attackers: tuple[int, ...] = (), **kw: Any) -> LocalSwarm:
    tmp = kw["tmp"]
    workers = []
    for i in range(n):
        args = {k: v for k, v in kw.items() if k != "tmp"}
        if i in attackers:
            args["attack"] = "fabricate"
        cfg = policy_config(tmp=tmp, **args)
        workers.append(SwarmWorker(cfg, peer_id(i), out_dir=tmp / f"peer{i}"))
    return LocalSwarm(workers)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_peers_verify_each_others_rollouts_agree_and_raise_the_agreed_reward(
    prepared_data: Path,
    tmp_path: Path,
    init_lm: Path,
    reward_ckpt: Path,
    prompts: Path,
    algo: str,
) -> None:
    swarm = make_swarm(
        3,
        data=prepared_data,
        tmp=tmp_path,
        init_lm=init_lm,
        reward_ckpt=reward_ckpt,
        prompts=prompts,
        algo=algo,
    )
    workers = list(swarm.workers.values())
    try:
        assert len({w.params_sha256() for w in workers}) == 1
        before = -workers[0].evaluate()
        for r in range(1, ROUNDS + 1):
            reports = swarm.run_round(r)
            assert len({w.params_sha256() for w in workers}) == 1, f"round {r}: diverged"
            for rep in reports.values():
                assert rep.invalid == {}, rep.invalid
                assert rep.verified == dict.fromkeys(sorted(swarm.workers), 2)
                assert len(rep.accepted) == 3
        after = [-w.evaluate() for w in workers]
        metrics = workers[0].eval_metrics
    finally:
        swarm.close()
    print(f"{algo}: held-out agreed reward {before:.3f} -> {after[0]:.3f}, {metrics}")
    assert len(set(after)) == 1  # the same policy, prompts and streams on every peer
    assert after[0] > before + 0.5
    assert metrics["kl"] > 0


def test_a_peer_fabricating_rewards_is_rejected_with_evidence_and_charged(
    prepared_data: Path, tmp_path: Path, init_lm: Path, reward_ckpt: Path, prompts: Path
) -> None:
    swarm = make_swarm(
        4,
        attackers=(3,),
        data=prepared_data,
        tmp=tmp_path,
        init_lm=init_lm,
        reward_ckpt=reward_ckpt,
        prompts=prompts,
        algo="ppo",
    )
    workers = list(swarm.workers.values())
    liar = peer_id(3)
    try:
        for r in range(1, 4):
            reports = swarm.run_round(r)
            assert len({w.params_sha256() for w in workers}) == 1
            for rep in reports.values():
                assert list(rep.invalid) == [liar]
                assert "reward claimed" in rep.invalid[liar]
                evidence = rep.rejected[liar]
                assert evidence["round"] == r
                assert len(str(evidence["payload_sha256"])) == 64
                assert evidence["claimed"] != evidence["recomputed"]
                assert sorted(rep.accepted) == [peer_id(i) for i in range(3)]
        with_liar = workers[0].params_sha256()
        reputation = dict(workers[0].engine.reputation)
    finally:
        swarm.close()
    honest = make_swarm(
        3,
        data=prepared_data,
        tmp=tmp_path / "honest",
        init_lm=init_lm,
        reward_ckpt=reward_ckpt,
        prompts=prompts,
        algo="ppo",
    )
    try:
        for r in range(1, 4):
            honest.run_round(r)
        without_liar = honest.workers[peer_id(0)].params_sha256()
    finally:
        honest.close()
    assert reputation[liar] == pytest.approx(0.5**3)  # halved each round: excluded, then evicted
    assert all(reputation.get(peer_id(i), 1.0) >= 0.99 for i in range(3))
    # the forged rollouts never reached the aggregate: the agreed policy is bit for bit the
    # one the three honest peers reach alone
    assert with_liar == without_liar


def one_objective(
    prepared_data: Path, tmp_path: Path, init_lm: Path, reward_ckpt: Path, prompts: Path
) -> tuple[SwarmWorker, PolicyObjective]:
    cfg = policy_config(
        prepared_data,
        tmp_path,
        init_lm,
        reward_ckpt,
        prompts,
        "ppo",
        data_shard=0,
        ppo={"verify_sample": 8},  # every rollout: a forgery anywhere is found
    )
    worker = SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "peer")
    objective = worker.objective
    assert isinstance(objective, PolicyObjective)
    return worker, objective


def test_each_kind_of_forged_rollout_is_rejected_naming_what_differs(
    prepared_data: Path, tmp_path: Path, init_lm: Path, reward_ckpt: Path, prompts: Path
) -> None:
    worker, obj = one_objective(prepared_data, tmp_path, init_lm, reward_ckpt, prompts)
    try:
        obj.begin_round(1, peer_id(0))
        honest = obj.attachment()
        seed = bytes(32)

        def verdict(edit: Any) -> str | None:
            rec = RolloutRecord.decode(honest)
            edit(rec.rollouts)
            return obj.verify(1, peer_id(0), rec.encode(), seed).reason

        assert obj.verify(1, peer_id(0), honest, seed).reason is None
        assert obj.verify(1, peer_id(0), honest, seed).checked == 8

        def reward(rs: Any) -> None:
            rs[2].reward += 1e-6

        def logprob(rs: Any) -> None:
            rs[1].logprobs[0] += 0.05

        def token(rs: Any) -> None:
            r = rs[0]
            r.response[0] = (r.response[0] + 1) % 500
            r.finished = r.response[-1] == obj.tok.eos_id

        def prompt(rs: Any) -> None:
            rs[3].prompt = [*rs[3].prompt, 5]

        def longer(rs: Any) -> None:
            rs[0].response = [7] * 9
            rs[0].logprobs = [-1.0] * 9
            rs[0].finished = False

        def nan(rs: Any) -> None:
            rs[0].reward = math.nan

        def missing(rs: Any) -> None:
            del rs[-1]

        assert "reward claimed" in str(verdict(reward))
        assert "log-prob of token 0 claimed" in str(verdict(logprob))
        assert "token 0" in str(verdict(token))
        assert "not the prompt the swarm assigned" in str(verdict(prompt))
        assert "response of 9 tokens" in str(verdict(longer))
        assert "non-finite" in str(verdict(nan))
        assert "7 rollouts, the round asks 8" in str(verdict(missing))
        assert "not compressed JSON" in str(obj.verify(1, peer_id(0), b"junk", seed).reason)
        # another peer's record is checked against that peer's prompts and streams
        assert "not the prompt" in str(obj.verify(1, peer_id(1), honest, seed).reason)
        # and a bomb does not inflate past the bound
        import zlib

        bomb = zlib.compress(b"[" * (9 << 20))
        assert "inflates beyond" in str(obj.verify(1, peer_id(0), bomb, seed).reason)
    finally:
        worker.close()


def test_the_sample_of_checked_rollouts_depends_on_the_decided_round() -> None:
    picks = {tuple(sample_indices(bytes([i]) * 32, "p", 16, 2)) for i in range(40)}
    assert len(picks) > 20  # unpredictable without the seed, which exists only once decided
    assert sample_indices(b"x" * 32, "p", 16, 2) == sample_indices(b"x" * 32, "p", 16, 2)
    assert miss_probability(16, 1, 2) == pytest.approx(14 / 16)
    assert miss_probability(16, 16, 2) == 0.0
    assert miss_probability(16, 4, 2) == pytest.approx(12 * 11 / (16 * 15))


def test_policy_sections_refuse_what_cannot_be_verified(
    prepared_data: Path, tmp_path: Path, init_lm: Path, reward_ckpt: Path, prompts: Path
) -> None:
    args = (prepared_data, tmp_path, init_lm, reward_ckpt, prompts)
    with pytest.raises(ValueError, match=r'needs swarm.mode "diloco" without overlap'):
        policy_config(*args, "ppo", mode="cooperative")
    with pytest.raises(ValueError, match=r'needs swarm.mode "diloco" without overlap'):
        policy_config(*args, "grpo", overlap=True)
    with pytest.raises(ValueError, match=r"swarm.grpo.group_size"):
        policy_config(*args, "grpo", grpo={"group_size": 1})
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    cfg = policy_config(*args[:4], few, "ppo", data_shard=0)
    with pytest.raises(SwarmError, match=r"swarm.ppo.prompts_file: 2 prompts .* eval_prompts=16"):
        SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "p")
    cfg = policy_config(*args[:3], init_lm, prompts, "ppo", data_shard=0)
    with pytest.raises(SwarmError, match=r"swarm.ppo.reward_checkpoint: .*not a reward-model"):
        SwarmWorker(cfg, peer_id(0), out_dir=tmp_path / "q")
    assert json.loads(json.dumps(cfg.model_dump(mode="json")))["swarm"]["ppo"]["kl_coef"] == 0.02
