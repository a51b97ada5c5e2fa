"""Configs of the alignment runs: one pydantic model per command, loaded with ``--config FILE``
and ``--set key=value`` overrides (see :mod:`swarmlm.config`).

Algorithm settings (``reward``, ``dpo``, ``ppo`` sections) are separate from file and run
settings so that the trainers can be driven from code and tests without any files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from swarmlm.config import StrictModel
from swarmlm.rlhf.safety import SafetyConfig
from swarmlm.train.config import OptimConfig


def _default_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))


class RunSettings(StrictModel):
    out_dir: Path = Field(description="run directory; checkpoints go to out_dir/checkpoints")
    tokenizer: Path | None = Field(
        default=None, description="tokenizer.json; default: the one the base checkpoint names"
    )
    seed: int = 0
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    optim: OptimConfig = Field(default_factory=_default_optim)
    grad_clip: float | None = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0, description="linear learning-rate warm-up")
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="learning rate after warm-up: constant, or decayed to 0 at the last step",
    )


class PairDataSettings(StrictModel):
    train_file: Path = Field(description="preference JSONL: prompt, chosen, rejected")
    eval_file: Path | None = Field(default=None, description="held-out pairs (default: a split)")
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    max_len: int = Field(default=256, ge=4, description="tokens of prompt + response")
    batch_size: int = Field(default=8, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop earlier than epochs")


class RewardConfig(StrictModel):
    use_margin: bool = Field(default=False, description="subtract each pair's 'margin'")
    centring_coef: float = Field(default=0.0, ge=0, description="weight of mean((r_c + r_r)^2)")
    head_init_std: float | None = Field(
        default=None,
        gt=0,
        description="std of the scalar head's initial weights; default 1/sqrt(d_model + 1) "
        "(Ziegler et al. 2019); Hugging Face heads use the config's initializer_range, 0.02",
    )
    normalise: bool = Field(
        default=True, description="fit reward mean/std on the reference responses after training"
    )


class RewardRunConfig(RunSettings, PairDataSettings):
    init_checkpoint: Path = Field(description="language-model checkpoint to start from")
    reward: RewardConfig = Field(default_factory=RewardConfig)


class DPOConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class DPORunConfig(RunSettings, PairDataSettings):
    init_checkpoint: Path = Field(description="policy to fine-tune (a trainer checkpoint)")
    reference_checkpoint: Path | None = Field(default=None, description="default: init")
    dpo: DPOConfig = Field(default_factory=DPOConfig)


class PPOConfig(StrictModel):
    """PPO hyperparameters (defaults follow Ziegler et al. 2019 and Huang et al. 2022)."""

    rollout_batch_size: int = Field(default=16, ge=2, description="prompts per PPO step")
    minibatch_size: int = Field(default=8, ge=1)
    ppo_epochs: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=24, ge=1)
    temperature: float = Field(default=1.0, gt=0, description="sampling and log-prob temperature")
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    clip_range: float = Field(default=0.2, gt=0)
    clip_range_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    kl_controller: Literal["adaptive", "fixed"] = "adaptive"
    init_kl_coef: float = Field(default=0.05, ge=0)
    target_kl: float = Field(default=6.0, gt=0, description="nats per response (adaptive)")
    kl_horizon: int = Field(default=10000, ge=1)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        default=1.0, ge=0, description="subtracted from the score of a response without EOS"
    )
    separate_critic: bool = Field(
        default=False, description="a separate value network instead of a head on the policy"
    )

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError(
                f"minibatch_size={self.minibatch_size} exceeds rollout_batch_size="
                f"{self.rollout_batch_size} (field 'minibatch_size')"
            )
        return self


class PPORunConfig(RunSettings):
    policy_checkpoint: Path = Field(description="(fine-tuned) language model to optimise")
    reference_checkpoint: Path | None = Field(default=None, description="default: the policy")
    reward_checkpoint: Path = Field(description="reward model from `swarmlm rlhf reward`")
    prompts_file: Path = Field(description="prompts: text (one a line) or JSONL with 'prompt'")
    max_prompt_len: int = Field(default=64, ge=1, description="prompt tokens kept (the end)")
    steps: int = Field(default=100, ge=1, description="PPO steps (rollout + update)")
    normalise_reward: bool = Field(
        default=True, description="refit reward mean/std on the initial policy's samples"
    )
    filtered_score: float = Field(
        default=-1.0, description="score of a response the safety filter drops"
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig)


class SampleConfig(StrictModel):
    checkpoint: Path
    prompts_file: Path
    out_file: Path
    responses: int = Field(default=2, ge=2, description="2: pairwise tasks; more: ranking")
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.9, gt=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_prompt_len: int = Field(default=64, ge=1)
    batch_size: int = Field(default=16, ge=1)
    max_attempts: int = Field(default=4, ge=1, description="resampling rounds per prompt")
    seed: int = 0
    tokenizer: Path | None = None
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
