"""The PPO reward function reads the reward model where it was trained to read: at an EOS."""

from __future__ import annotations

import pytest
import torch

from swarmlm.model import ModelConfig, Transformer
from swarmlm.rlhf.modeling import RewardModel
from swarmlm.rlhf.ppo_run import reward_model_fn
from swarmlm.rlhf.preferences import right_pad

EOS, PAD = 1, 0


class _Tok:
    """The two ids and the decoder the reward function needs from a tokenizer."""

    eos_id, pad_id = EOS, PAD

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _reward_model() -> RewardModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    return RewardModel(Transformer(cfg)).eval()


def _direct(rm: RewardModel, seqs: list[list[int]]) -> torch.Tensor:
    ids, lengths = right_pad(seqs, PAD)
    return rm.score(ids, lengths)


def test_truncated_responses_are_scored_with_the_eos_reward_training_appends() -> None:
    # tokenize_pairs ends every training response with EOS, so a response cut at
    # max_new_tokens must be scored as prompt + response + EOS, not at its last word.
    rm = _reward_model()
    score = reward_model_fn(rm, _Tok())  # type: ignore[arg-type]
    prompts, responses = [[3, 4], [5]], [[6, 7, 8], [9, 10]]
    got = score(prompts, responses)
    want = _direct(rm, [[3, 4, 6, 7, 8, EOS], [5, 9, 10, EOS]])
    without_eos = _direct(rm, [[3, 4, 6, 7, 8], [5, 9, 10]])
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, without_eos, atol=1e-3)


def test_finished_responses_keep_their_single_eos() -> None:
    rm = _reward_model()
    score = reward_model_fn(rm, _Tok())  # type: ignore[arg-type]
    got = score([[3, 4]], [[6, EOS]])
    assert torch.allclose(got, _direct(rm, [[3, 4, 6, EOS]]), atol=1e-6)


def test_the_caller_s_responses_are_left_untouched() -> None:
    rm = _reward_model()
    responses = [[6, 7]]
    reward_model_fn(rm, _Tok())([[3]], responses)  # type: ignore[arg-type]
    assert responses == [[6, 7]]


def test_on_policy_normalisation_gives_the_policy_s_samples_mean_0_and_std_1() -> None:
    from swarmlm.rlhf.config import PPOConfig
    from swarmlm.rlhf.ppo import PPOTrainer
    from swarmlm.rlhf.ppo_run import normalise_on_policy

    rm = _reward_model()
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    policy = Transformer(cfg)
    score = reward_model_fn(rm, _Tok())  # type: ignore[arg-type]
    ppo = PPOConfig(rollout_batch_size=16, minibatch_size=8, max_new_tokens=4)
    trainer = PPOTrainer(policy, Transformer(cfg), score, ppo, eos_id=EOS, pad_id=PAD)
    prompts = [[3 + i % 5, 4] for i in range(32)]
    torch.manual_seed(7)
    normalise_on_policy(trainer, rm, prompts, 32, EOS, PAD)
    torch.manual_seed(7)
    roll = trainer.sample(prompts)  # the same samples again
    scores = score(roll.prompts, roll.responses)
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-4)


def test_reward_head_starts_at_the_configured_scale() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=256, n_layers=1, n_heads=2, max_seq_len=16)
    default = RewardModel(Transformer(cfg))
    small = RewardModel(Transformer(cfg), head_init_std=0.02)
    assert float(default.head.weight.detach().std()) == pytest.approx(1 / 257**0.5, rel=0.2)
    assert float(small.head.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert float(small.head.bias.detach().abs().sum()) == 0.0
