"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), with the details of
Huang et al., "The N Implementation Details of RLHF with PPO" (2022):

* rollouts sample with the KV cache (:func:`swarmlm.model.generate.generate`); their
  log-probs are then recomputed by one forward pass over prompt + response at the *sampling
  temperature*, so old, new and reference log-probs all describe the same distribution;
* the reference model is a frozen copy; the per-token reward is ``-beta (log pi - log ref)``
  with the reward model's score added at the last token; ``beta`` is fixed or follows the
  adaptive controller of Ziegler et al.;
* a response without an end token has ``missing_eos_penalty`` subtracted from its score;
* GAE (gamma, lambda) over response tokens, advantages whitened per batch, optional reward
  whitening; the value head is zero-initialised (a separate critic network is optional);
* clipped policy and value losses, several epochs over shuffled minibatches, gradient
  clipping, dropout off (the models run in eval mode throughout).

Every step logs reward, KL, KL coefficient, clip fraction, approximate KL, value loss,
entropy and response length. The update goes through a plain ``torch.optim`` optimizer (the
trainer's AdamW), so a swarm can later replace ``optimizer.step()`` without touching PPO.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from swarmlm.model import Transformer
from swarmlm.model.generate import GenerationConfig, generate
from swarmlm.rlhf.config import PPOConfig
from swarmlm.rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    logprobs_of,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from swarmlm.rlhf.modeling import HiddenStates, ValueHead
from swarmlm.rlhf.preferences import right_pad
from swarmlm.rlhf.runs import clip_gradients
from swarmlm.train.config import OptimConfig
from swarmlm.train.optim import build_adamw

log = logging.getLogger(__name__)

RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]
"""``reward_fn(prompts, responses) -> (batch,) scores``; responses end with EOS when the
model produced one."""


@dataclass
class Rollout:
    """Sampled responses: ``ids`` (b, seq) right-padded prompt + response (EOS included when
    sampled), ``prompt_lengths`` / ``lengths`` (b,), ``finished`` (b,) True when EOS ended it."""

    prompts: list[list[int]]
    responses: list[list[int]]
    ids: Tensor
    prompt_lengths: Tensor
    lengths: Tensor
    finished: Tensor

    def response_mask(self) -> Tensor:
        """(b, seq - 1) float: 1 where position ``j`` predicts a response token ``j + 1``."""
        pos = torch.arange(1, self.ids.shape[1])[None, :]
        return ((pos >= self.prompt_lengths[:, None]) & (pos < self.lengths[:, None])).float()


class PPOTrainer:
    """One PPO step = rollout on a batch of prompts, scoring, advantages, clipped updates."""

    def __init__(
        self,
        policy: Transformer,
        reference: Transformer,
        reward_fn: RewardFn,
        cfg: PPOConfig,
        *,
        eos_id: int,
        pad_id: int,
        optim: OptimConfig | None = None,
        grad_clip: float | None = 1.0,
        critic: Transformer | None = None,
    ) -> None:
        if policy.cfg.vocab_size != reference.cfg.vocab_size:
            raise ValueError(
                f"policy vocab_size {policy.cfg.vocab_size} differs from the reference's "
                f"{reference.cfg.vocab_size}"
            )
        self.cfg = cfg
        self.policy = policy.eval()
        self.reference = reference.eval().requires_grad_(False)
        self.reward_fn = reward_fn
        self.eos_id, self.pad_id = eos_id, pad_id
        self.grad_clip = grad_clip
        self.hidden = HiddenStates(policy)
        modules: dict[str, nn.Module] = {"policy": policy}
        self.critic: Transformer | None = None
        if cfg.separate_critic:
            self.critic = (critic or copy.deepcopy(policy)).eval()
            self.critic_hidden = HiddenStates(self.critic)
            modules["critic"] = self.critic
        self.value_head = ValueHead(policy.cfg.d_model)
        modules["value_head"] = self.value_head
        self.module = nn.ModuleDict(modules)
        self.optimizer = build_adamw(
            self.module, optim or OptimConfig(lr=1e-5, weight_decay=0.0, betas=(0.9, 0.95))
        )
        self.kl_ctl: AdaptiveKLController | FixedKLController
        if cfg.kl_controller == "adaptive":
            self.kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(cfg.init_kl_coef)
        self.steps_done = 0
        self.last_rollout: Rollout | None = None

    # ---- rollouts ------------------------------------------------------------------------

    def sample(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        """Sample one response per prompt with the KV cache (pure sampling at the
        configured temperature: no top-k / top-p, which would change the distribution whose
        log-probs PPO optimises)."""
        gen = generate(
            self.policy,
            prompts,
            GenerationConfig(
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=True,
                temperature=self.cfg.temperature,
                stop_tokens=[self.eos_id],
                pad_token_id=self.pad_id,
            ),
        )
        responses, finished = [], []
        for seq, reason in zip(gen.sequences, gen.finish_reasons, strict=True):
            done = reason == "stop"
            responses.append([*seq, self.eos_id] if done else list(seq))
            finished.append(done)
        ids, lengths = right_pad(
            [[*p, *r] for p, r in zip(prompts, responses, strict=True)], self.pad_id
        )
        return Rollout(
            prompts=[list(p) for p in prompts],
            responses=responses,
            ids=ids,
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
            lengths=lengths,
            finished=torch.tensor(finished, dtype=torch.bool),
        )

    def _forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Policy logits (b, s-1, vocab) and values (b, s-1) for positions 0 .. s-2."""
        logits = self.policy(ids[:, :-1]).logits
        if self.critic is None:
            hidden = self.hidden.take()
        else:
            self.hidden.take()
            self.critic(ids[:, :-1], num_logits_to_keep=1)
            hidden = self.critic_hidden.take()
        return logits, self.value_head(hidden)

    # ---- one step ------------------------------------------------------------------------

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """Rollout, score and update on ``prompts``; returns the step's statistics."""
        if len(prompts) < 1:
            raise ValueError("a PPO step needs at least one prompt")
        cfg = self.cfg
        t0 = time.perf_counter()
        roll = self.sample(prompts)
        t_sample = time.perf_counter() - t0
        ids, mask = roll.ids, roll.response_mask()
        targets = ids[:, 1:]
        with torch.no_grad():
            logits, values = self._forward(ids)
            old_lp = logprobs_of(logits, targets, cfg.temperature)
            entropy = masked_mean(entropy_from_logits(logits, cfg.temperature), mask)
            del logits
            ref_lp = logprobs_of(self.reference(ids[:, :-1]).logits, targets, cfg.temperature)
            raw_scores = self.reward_fn(roll.prompts, roll.responses).float().reshape(-1)
            if raw_scores.shape[0] != len(prompts):
                raise ValueError(
                    f"reward_fn returned {raw_scores.shape[0]} scores for {len(prompts)} responses"
                )
            scores = raw_scores.clone()
            if cfg.missing_eos_penalty is not None:
                scores = torch.where(roll.finished, scores, scores - cfg.missing_eos_penalty)
            rewards, kl = kl_penalised_rewards(scores, old_lp, ref_lp, mask, self.kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)

        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approxkl", "vf_clipfrac")
        }
        grad_norms: list[float] = []
        n = ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, cfg.minibatch_size):
                mb = order[start : start + cfg.minibatch_size]
                logits, vpred = self._forward(ids[mb])
                lp = logprobs_of(logits, targets[mb], cfg.temperature)
                pg_loss, clipfrac, approxkl = ppo_policy_loss(
                    lp, old_lp[mb], advantages[mb], mask[mb], cfg.clip_range
                )
                vf_loss, vf_clipfrac = ppo_value_loss(
                    vpred, values[mb], returns[mb], mask[mb], cfg.clip_range_value
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norms.append(clip_gradients(self.module, self.grad_clip))
                self.optimizer.step()
                for key, value in (
                    ("policy_loss", pg_loss),
                    ("value_loss", vf_loss),
                    ("clipfrac", clipfrac),
                    ("approxkl", approxkl),
                    ("vf_clipfrac", vf_clipfrac),
                ):
                    stats[key].append(float(value.detach()))

        seq_kl = float(kl.sum(1).mean())
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(seq_kl, n)
        self.steps_done += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(
            {
                "step": float(self.steps_done),
                "reward": float(raw_scores.mean()),
                "score": float(scores.mean()),
                "kl": seq_kl,
                "kl_coef": kl_coef,
                "entropy": float(entropy),
                "response_length": float(mask.sum(1).mean()),
                "no_eos_fraction": float((~roll.finished).float().mean()),
                "grad_norm": sum(grad_norms) / len(grad_norms),
                "sample_seconds": t_sample,
                "seconds": time.perf_counter() - t0,
            }
        )
        log.info(
            "ppo step %d reward %.3f kl %.3f kl_coef %.4f clipfrac %.3f approxkl %.4f "
            "value_loss %.4f entropy %.3f length %.1f",
            self.steps_done,
            out["reward"],
            out["kl"],
            kl_coef,
            out["clipfrac"],
            out["approxkl"],
            out["value_loss"],
            out["entropy"],
            out["response_length"],
        )
        self.last_rollout = roll
        return out

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the policy weights (saved as the checkpoint's model)."""
        state: dict[str, Any] = {
            "value_head": self.value_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "steps_done": self.steps_done,
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value_head.load_state_dict(state["value_head"])
        if self.critic is not None:
            if "critic" not in state:
                raise ValueError("checkpoint has no critic but ppo.separate_critic is set")
            self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.steps_done = int(state["steps_done"])
