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

Two adjustments give TRL's PPO the same reward as ours (both optional, both on in the
benchmark), so neither side wins by how its reward model is read:

* ``score_at_eos``: both reward models were trained on responses ending with EOS (TRL's
  ``RewardTrainer`` appends it, as our ``tokenize_pairs`` does), but PPO's responses are cut at
  ``response_length`` without one, and TRL reads the score at the last word, where the head was
  never trained (our reward model's held-out accuracy read there: 0.75 instead of 0.89). Our
  ``reward_model_fn`` appends the EOS for scoring; :class:`ReadAtEos` does the same inside
  TRL's reward call.
* ``reward_norm``: our rewards are normalised to mean 0 / std 1 on reference responses; TRL's
  raw score is not, so the same KL coefficient weighed the KL 2-3x less on TRL's side. The
  score head becomes ``(w h - mean) / std`` with the mean and std of TRL's own reward model on
  the same reference responses.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn


class ReadAtEos(nn.Module):
    """Wraps a reward model's backbone for TRL's ``get_reward``: a row whose last real token is
    not EOS gets one appended, and the hidden state of that EOS is returned at the last real
    token's position, the position ``get_reward`` reads the score from. Rows that end with EOS
    (TRL truncates a response after its first stop token and keeps it) pass unchanged."""

    def __init__(self, backbone: nn.Module, eos_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.eos_id = eos_id

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, **kwargs: Any
    ) -> SimpleNamespace:
        b, s = input_ids.shape
        mask = attention_mask.bool()
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        last = torch.where(mask, positions, -1).max(1).values.clamp(min=0)
        rows = torch.arange(b, device=input_ids.device)
        append = (input_ids[rows, last] != self.eos_id).nonzero().squeeze(1)
        ids = torch.cat((input_ids, input_ids.new_zeros(b, 1)), 1)
        mask = torch.cat((mask, mask.new_zeros(b, 1)), 1)
        ids[append, last[append] + 1] = self.eos_id
        mask[append, last[append] + 1] = True
        pos = mask.long().cumsum(1) - mask.long()
        kwargs["output_hidden_states"] = True
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        hidden = out.hidden_states[-1]
        read = hidden[:, :s].clone()
        read[append, last[append]] = hidden[append, last[append] + 1]
        return SimpleNamespace(hidden_states=(read,))


def normalised_score_head(head: nn.Linear, mean: float, std: float) -> nn.Linear:
    """A score head with a bias that outputs ``(head(h) - mean) / std``."""
    out = nn.Linear(head.in_features, 1, bias=True)
    with torch.no_grad():
        out.weight.copy_(head.weight / std)
        bias = head.bias if head.bias is not None else torch.zeros(1)
        out.bias.copy_((bias - mean) / std)
    return out


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
    score_at_eos: bool = True,
    reward_norm: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` PPO updates of the exported base model against ``reward_model`` (TRL's
    own, from ``RewardTrainer``; not modified: a wrapped copy is used). ``reward_norm`` =
    (mean, std) of its raw score on reference responses. Returns the trained policy's
    directory (HF format) and the wall and CPU time of every update, rollout included."""
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
    import copy

    reward_model = copy.deepcopy(reward_model)
    reward_model.config.pad_token_id = tok.pad_token_id
    if score_at_eos:
        prefix = reward_model.base_model_prefix
        setattr(reward_model, prefix, ReadAtEos(getattr(reward_model, prefix), tok.eos_token_id))
    if reward_norm is not None:
        reward_model.score = normalised_score_head(reward_model.score, *reward_norm)
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
        disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        """Wall time between consecutive updates (TRL ends a step after rollout + epochs)."""

        def __init__(self) -> None:
            self.last = time.perf_counter()
            self.last_cpu = time.process_time()
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []
            self.logs: list[dict[str, float]] = []

        def on_step_end(self, *_: Any, **__: Any) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            self.seconds.append(now - self.last)
            self.cpu_seconds.append(cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu

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
    timer.last, timer.last_cpu = t0, time.process_time()
    trainer.train()
    seconds = time.perf_counter() - t0
    final = out / "final"
    policy.save_pretrained(final)
    return {
        "policy_dir": final,
        "step_seconds": timer.seconds,
        "step_cpu_seconds": timer.cpu_seconds,
        "seconds": seconds,
        "logs": timer.logs,
    }
