"""TRL's PPO as the reference contender of the RLHF benchmark (``benchmarks/rlhf.py``).

TRL removed its PPO trainer in September 2026 (huggingface/trl#7020); the last releases that
ship it live in ``trl.experimental.ppo`` (1.10-1.12), and those install next to torch 2.13.0
and transformers 5, so the benchmark's ``bench`` extra pins ``trl>=1.12,<1.13``. Nothing
here is imported by the package or the tests.

TRL's PPO differs from ours by design, and the comparison keeps those differences rather than
hiding them: it needs a separate value model (a sequence-classification copy of the base
model; ours is a zero-initialised head on the policy), and its KL penalty has a fixed
coefficient (ours is adaptive, Ziegler et al. 2019, starting from the same value). Everything
else is set equal: rollout batch, minibatch, PPO epochs, response length, temperature,
learning rate, clip ranges, value-loss coefficient, GAE gamma and lambda, no-EOS penalty.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def trl_ppo(
    hf_dir: Path,
    reward_model: Any,
    prompts: list[str],
    *,
    steps: int,
    rollout_batch: int,
    minibatch: int,
    ppo_epochs: int,
    response_length: int,
    lr: float,
    kl_coef: float,
    missing_eos_penalty: float,
    out: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``steps`` PPO updates of the exported base model against ``reward_model`` (TRL's
    own, from ``RewardTrainer``). Returns the trained policy's directory (HF format) and the
    wall time of every update, rollout included."""
    if minibatch > rollout_batch or rollout_batch % minibatch:
        raise ValueError(f"minibatch {minibatch} must divide rollout batch {rollout_batch}")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(hf_dir)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir)
    value = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    value.config.pad_token_id = tok.pad_token_id
    reward_model.config.pad_token_id = tok.pad_token_id
    reward_model.eval()
    n = steps * rollout_batch
    rows = [{"input_ids": tok(prompts[i % len(prompts)])["input_ids"]} for i in range(n)]
    args = PPOConfig(
        output_dir=str(out),
        # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps,
        # split into num_mini_batches; one optimizer step per minibatch as ours (with
        # accumulation > 1 accelerate would step once per that many minibatches).
        per_device_train_batch_size=rollout_batch,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout_batch // minibatch,
        local_rollout_forward_batch_size=rollout_batch,
        num_ppo_epochs=ppo_epochs,
        total_episodes=n,
        response_length=response_length,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=missing_eos_penalty,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        kl_coef=kl_coef,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        max_grad_norm=1.0,
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """Wall time between consecutive updates (TRL ends a step after rollout + epochs)."""

        def __init__(self) -> None:
            self.last = time.perf_counter()
            self.seconds: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(
            self, _args: Any, _state: Any, _control: Any, logs: Any = None, **__: Any
        ) -> None:
            if logs:
                self.logs.append(
                    {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
                )

    timer = StepTimer()
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value,
        train_dataset=Dataset.from_list(rows),
        callbacks=[timer],
    )
    t0 = time.perf_counter()
    timer.last = t0
    trainer.train()
    seconds = time.perf_counter() - t0
    final = out / "final"
    policy.save_pretrained(final)
    return {
        "policy_dir": final,
        "step_seconds": timer.seconds,
        "seconds": seconds,
        "logs": timer.logs,
    }
