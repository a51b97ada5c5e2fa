"""PPO on a tiny policy with an easily learnable reward (the count of one token)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from swarmlm.model import ModelConfig, Transformer
from swarmlm.rlhf.config import PPOConfig
from swarmlm.rlhf.ppo import PPOTrainer
from swarmlm.train.config import OptimConfig

EOS, PAD, TARGET = 1, 2, 5


def count_reward(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
) -> torch.Tensor:
    return torch.tensor([sum(t == TARGET for t in r) / 4 for r in responses])


def make_trainer(seed: int = 0, **overrides: object) -> PPOTrainer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    policy, reference = Transformer(cfg), Transformer(cfg)
    reference.load_state_dict(policy.state_dict())
    ppo = PPOConfig.model_validate(
        {
            "rollout_batch_size": 16,
            "minibatch_size": 8,
            "max_new_tokens": 8,
            "target_kl": 6.0,
            "init_kl_coef": 0.05,
            "kl_horizon": 100,
            **overrides,
        }
    )
    return PPOTrainer(
        policy,
        reference,
        count_reward,
        ppo,
        eos_id=EOS,
        pad_id=PAD,
        optim=OptimConfig(lr=3e-3, weight_decay=0.0),
    )


PROMPTS = [[3, 4, 6, 7][: 1 + i % 4] for i in range(16)]


@pytest.mark.timeout(300)
def test_ppo_raises_a_learnable_reward_while_kl_stays_under_target() -> None:
    trainer = make_trainer()
    history = [trainer.step(PROMPTS) for _ in range(2)]
    start = sum(h["reward"] for h in history) / 2
    reached = None
    for _ in range(40):
        stats = trainer.step(PROMPTS)
        history.append(stats)
        if stats["reward"] >= start + 0.4:
            reached = stats
            break
    assert reached is not None, [round(h["reward"], 2) for h in history]
    assert reached["kl"] < 6.0
    for key in ("clipfrac", "approxkl", "value_loss", "entropy", "response_length", "kl_coef"):
        assert key in reached


def test_value_head_starts_at_zero_and_the_first_step_logs_finite_stats() -> None:
    trainer = make_trainer()
    ids = torch.tensor([[3, 4, 5, 6]])
    _, values = trainer._forward(ids)
    assert torch.equal(values, torch.zeros(1, 3))
    stats = trainer.step(PROMPTS)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before the update


def test_rollout_logprobs_use_the_sampling_temperature() -> None:
    trainer = make_trainer(temperature=0.7)
    roll = trainer.sample(PROMPTS[:4])
    from swarmlm.model.generate import generate
    from swarmlm.rlhf.losses import logprobs_of

    torch.manual_seed(1)
    gen = generate(
        trainer.policy,
        PROMPTS[:1],
        do_sample=True,
        temperature=0.7,
        max_new_tokens=4,
        stop_tokens=[EOS],
        pad_token_id=PAD,
    )
    seq = [*PROMPTS[0], *gen.sequences[0]]
    with torch.no_grad():
        logits = trainer.policy(torch.tensor([seq[:-1]])).logits
    lp = logprobs_of(logits, torch.tensor([seq[1:]]), 0.7)[0, len(PROMPTS[0]) - 1 :]
    assert lp.tolist() == pytest.approx(gen.logprobs[0], abs=1e-4)
    mask = roll.response_mask()
    assert mask.sum(1).tolist() == [float(len(r)) for r in roll.responses]


def test_missing_eos_penalty_lowers_the_score_of_unfinished_responses() -> None:
    trainer = make_trainer(max_new_tokens=1, missing_eos_penalty=3.0)
    stats = trainer.step(PROMPTS)
    unfinished = stats["no_eos_fraction"]
    assert unfinished > 0
    assert stats["score"] == pytest.approx(stats["reward"] - 3.0 * unfinished, abs=1e-5)


def test_state_round_trip_restores_value_head_optimizer_and_kl_coefficient() -> None:
    a = make_trainer(separate_critic=True)
    a.step(PROMPTS)
    state = a.state_dict()
    b = make_trainer(separate_critic=True)
    b.load_state_dict(state)
    assert b.kl_ctl.value == a.kl_ctl.value
    assert b.steps_done == 1
    assert torch.equal(b.value_head.proj.weight, a.value_head.proj.weight)
    assert b.critic is not None
    assert a.critic is not None
    for (_, pa), (_, pb) in zip(
        a.critic.named_parameters(), b.critic.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb)


@pytest.mark.timeout(300)
def test_ppo_learns_behind_prompts_longer_than_the_response() -> None:
    # The score must reach the last response token however long the prompt: behind a
    # 12-token prompt and 8-token responses it once landed on the prompt and was lost.
    trainer = make_trainer()
    long_prompts = [[3, 4, 6, 7] * 3 for _ in range(16)]
    start = sum(trainer.step(long_prompts)["reward"] for _ in range(2)) / 2
    best = max(trainer.step(long_prompts)["reward"] for _ in range(40))
    assert best >= start + 0.4
