"""``swarmlm rlhf ppo``: PPO against a trained reward model, from files, resumable.

The reward function scores prompt + response with the reward model (normalised), after the
safety filter: a response it drops gets ``filtered_score`` instead, so PPO learns to avoid it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from swarmlm.data import Tokenizer
from swarmlm.rlhf.config import PPORunConfig
from swarmlm.rlhf.modeling import (
    RewardModel,
    base_config,
    check_same_vocab,
    load_language_model,
    load_reward_model,
    tokenizer_for,
)
from swarmlm.rlhf.ppo import PPOTrainer, RewardFn
from swarmlm.rlhf.preferences import right_pad
from swarmlm.rlhf.prompts import read_prompts
from swarmlm.rlhf.runs import batch_indices, make_progress, resume_checkpoint, save_run, seed_all
from swarmlm.rlhf.safety import SafetyFilter, build_safety_filter

log = logging.getLogger(__name__)


def scoring_ids(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eos_id: int, pad_id: int
) -> tuple[Tensor, Tensor]:
    """Right-padded prompt + response + EOS (one EOS: a finished response keeps its own) and
    the lengths: what the reward model reads, as it was trained (see :func:`reward_model_fn`)."""
    return right_pad(
        [
            [*p, *r] if r and r[-1] == eos_id else [*p, *r, eos_id]
            for p, r in zip(prompts, responses, strict=True)
        ],
        pad_id,
    )


def reward_model_fn(
    rm: RewardModel,
    tok: Tokenizer,
    safety: SafetyFilter | None = None,
    filtered_score: float = -1.0,
) -> RewardFn:
    """A PPO reward function: normalised reward-model scores, safety-filtered responses get
    ``filtered_score``.

    The reward model learnt to read its score at an EOS (``tokenize_pairs`` ends every
    training response with one), so a response cut at ``max_new_tokens`` is scored with an EOS
    appended, as annotators' truncated responses were. Read at its last word instead, the head
    sits at a position it never learnt: held-out accuracy 0.75 instead of 0.89 in the
    benchmark, and PPO climbed that noisier score without raising the true reward. That the
    response did not finish is PPO's ``missing_eos_penalty``, not the reward model's concern.
    """

    def score(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> Tensor:
        ids, lengths = scoring_ids(prompts, responses, tok.eos_id, tok.pad_id)
        scores = rm.score(ids, lengths)
        if safety is not None and safety.checks:
            for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
                verdict = safety.check(tok.decode(p), tok.decode(r), item=f"ppo response {row}")
                if not verdict.ok:
                    scores[row] = filtered_score
        return scores

    return score


def train_ppo(
    cfg: PPORunConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    policy, base_ckpt = load_language_model(cfg.policy_checkpoint)
    ref_path = cfg.reference_checkpoint or cfg.policy_checkpoint
    reference, _ = load_language_model(ref_path)
    rm, _ = load_reward_model(cfg.reward_checkpoint)
    check_same_vocab(policy, str(cfg.policy_checkpoint), reference, str(ref_path))
    check_same_vocab(policy, str(cfg.policy_checkpoint), rm.backbone, str(cfg.reward_checkpoint))
    rm.eval().requires_grad_(False)
    tok = tokenizer_for(base_ckpt, cfg.tokenizer)
    safety = build_safety_filter(
        cfg.safety, reward_score=lambda p, r: float(_score_text(rm, tok, p, r))
    )
    prompts = [
        tok.encode(p)[-cfg.max_prompt_len :] or [tok.bos_id]
        for p in safety.filter_prompts(read_prompts(cfg.prompts_file))
    ]
    if not prompts:
        raise ValueError(f"{cfg.prompts_file}: no prompts left after the safety filter")
    trainer = PPOTrainer(
        policy,
        reference,
        reward_model_fn(rm, tok, safety, cfg.filtered_score),
        cfg.ppo,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        optim=cfg.optim,
        grad_clip=cfg.grad_clip,
    )
    history: list[dict[str, float]] = []
    ckpt = resume_checkpoint(cfg, "ppo", resume)
    if ckpt is not None:
        policy.load_state_dict(ckpt.model_state)
        trainer.load_state_dict(ckpt.trainer_state["ppo"])
        rm.reward_mean.fill_(float(ckpt.trainer_state["reward_norm"][0]))
        rm.reward_std.fill_(float(ckpt.trainer_state["reward_norm"][1]))
        history = list(ckpt.state["rlhf"].get("history", []))
    elif cfg.normalise_reward:
        normalise_on_policy(
            trainer, rm, prompts, max(2, 2 * cfg.ppo.rollout_batch_size), tok.eos_id, tok.pad_id
        )
    base_cfg = base_config(base_ckpt)

    def save(final: bool) -> str:
        trainer_state = {
            "ppo": trainer.state_dict(),
            "reward_norm": [float(rm.reward_mean), float(rm.reward_std)],
        }
        rlhf_state = {
            "kind": "ppo",
            "run_config": cfg.model_dump(mode="json"),
            "history": history,
            "filtered": safety.summary(),
            "finished": final,
        }
        return str(
            save_run(
                cfg, trainer.steps_done, policy.state_dict(), trainer_state, base_cfg, rlhf_state
            )
        )

    path = None
    with make_progress(console, show_progress) as progress:
        task = progress.add_task("ppo", total=cfg.steps, completed=trainer.steps_done, status="")
        while trainer.steps_done < cfg.steps:
            idx = batch_indices(
                len(prompts), cfg.ppo.rollout_batch_size, cfg.seed, trainer.steps_done
            )
            stats = trainer.step([prompts[int(i)] for i in idx])
            history.append(stats)
            progress.update(
                task,
                advance=1,
                status=f"reward {stats['reward']:.3f} kl {stats['kl']:.2f}",
            )
            if trainer.steps_done % cfg.checkpoint_every == 0 and trainer.steps_done < cfg.steps:
                save(final=False)
    path = save(final=True)
    last = history[-1] if history else {}
    return {
        "step": trainer.steps_done,
        "checkpoint": path,
        "reward": last.get("reward"),
        "kl": last.get("kl"),
        "filtered": safety.summary(),
        "seconds": time.perf_counter() - start,
    }


def _score_text(rm: RewardModel, tok: Tokenizer, prompt: str, response: str) -> float:
    ids, lengths = right_pad([tok.encode(prompt) + tok.encode(response)], tok.pad_id)
    return float(rm.score(ids, lengths)[0])


@torch.no_grad()
def normalise_on_policy(
    trainer: PPOTrainer,
    rm: RewardModel,
    prompts: list[list[int]],
    n: int,
    eos_id: int,
    pad_id: int,
) -> None:
    """Reward mean 0 / std 1 on the initial policy's samples (Ziegler et al. 2019), scored as
    PPO will score them (:func:`scoring_ids`)."""
    n = min(len(prompts), n)
    roll = trainer.sample(prompts[:n])
    ids, lengths = scoring_ids(roll.prompts, roll.responses, eos_id, pad_id)
    raw = torch.cat([rm(ids[i : i + 16], lengths[i : i + 16]) for i in range(0, n, 16)])
    rm.fit_normalisation(raw)
    log.info(
        "reward normalised on %d policy samples: mean %.4f std %.4f",
        n,
        float(rm.reward_mean),
        float(rm.reward_std),
    )
