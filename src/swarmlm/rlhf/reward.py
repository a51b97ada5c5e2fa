"""Reward-model training: Bradley-Terry on preference pairs, held-out pairwise accuracy, and
normalisation of the rewards to mean 0 / std 1 on reference responses.

``train_reward_model`` is the whole run (what ``swarmlm rlhf reward`` calls);
``reward_loss`` and ``evaluate_reward_model`` are the pieces tests and benchmarks reuse.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from swarmlm.model import Transformer
from swarmlm.rlhf.config import RewardConfig, RewardRunConfig
from swarmlm.rlhf.losses import bradley_terry_loss, pairwise_accuracy
from swarmlm.rlhf.modeling import (
    RewardModel,
    base_config,
    load_language_model,
    tokenizer_for,
    without_dropout,
)
from swarmlm.rlhf.preferences import TokenizedPairs
from swarmlm.rlhf.runs import (
    batch_indices,
    build_optimizer,
    clip_gradients,
    load_pair_data,
    make_progress,
    resume_checkpoint,
    save_run,
    seed_all,
    steps_for,
)
from swarmlm.rlhf.safety import build_safety_filter

log = logging.getLogger(__name__)


def reward_loss(
    rm: RewardModel, batch: TokenizedPairs, cfg: RewardConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, chosen rewards, rejected rewards) of one batch; both sides in one forward."""
    n = len(batch)
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    ids = torch.cat((_pad_to(batch.chosen_ids, width), _pad_to(batch.rejected_ids, width)))
    rewards = rm(ids, torch.cat((batch.chosen_lengths, batch.rejected_lengths)))
    chosen, rejected = rewards[:n], rewards[n:]
    margin = batch.margins if cfg.use_margin else None
    return bradley_terry_loss(chosen, rejected, margin, cfg.centring_coef), chosen, rejected


@torch.no_grad()
def evaluate_reward_model(
    rm: RewardModel, data: TokenizedPairs, cfg: RewardConfig, batch_size: int = 16
) -> dict[str, float]:
    """Held-out loss and pairwise accuracy (raw rewards)."""
    was = rm.training
    rm.eval()
    chosen, rejected, losses = [], [], []
    try:
        for i in range(0, len(data), batch_size):
            batch = data.select(torch.arange(i, min(len(data), i + batch_size)))
            loss, c, r = reward_loss(rm, batch, cfg)
            losses.append(float(loss) * len(batch))
            chosen.append(c)
            rejected.append(r)
    finally:
        rm.train(was)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "loss": sum(losses) / len(data),
        "accuracy": pairwise_accuracy(c, r),
        "chosen_mean": float(c.mean()),
        "rejected_mean": float(r.mean()),
    }


@torch.no_grad()
def fit_reward_normalisation(rm: RewardModel, ids: Tensor, lengths: Tensor) -> None:
    """Mean 0, std 1 on reference samples (``ids`` right-padded, ``lengths`` real tokens)."""
    was = rm.training
    rm.eval()
    try:
        raw = torch.cat([rm(ids[i : i + 32], lengths[i : i + 32]) for i in range(0, len(ids), 32)])
    finally:
        rm.train(was)
    rm.fit_normalisation(raw)


@dataclass
class RewardRunResult:
    step: int
    eval: dict[str, float]
    checkpoint: str | None
    filtered: dict[str, int]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "checkpoint": self.checkpoint,
            "filtered": self.filtered,
            "seconds": self.seconds,
            **{f"eval_{k}": v for k, v in self.eval.items()},
        }


def train_reward_model(
    cfg: RewardRunConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> RewardRunResult:
    """Train, evaluate, normalise and save a reward model; resumable from ``cfg.out_dir``."""
    start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    lm, base_ckpt = load_language_model(cfg.init_checkpoint)
    tok = tokenizer_for(base_ckpt, cfg.tokenizer)
    safety = build_safety_filter(cfg.safety)

    train_data, eval_data = load_pair_data(cfg, tok, safety, cfg.seed)

    rm = RewardModel(Transformer(without_dropout(lm.cfg)), head_init_std=cfg.reward.head_init_std)
    rm.backbone.load_state_dict(lm.state_dict())
    del lm
    total = steps_for(len(train_data), cfg.batch_size, cfg.epochs, cfg.max_steps)
    optimizer, schedule = build_optimizer(rm, cfg, total)
    step = 0
    ckpt = resume_checkpoint(cfg, "reward", resume)
    if ckpt is not None:
        rm.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.trainer_state["optimizer"])
        schedule.load_state_dict(ckpt.trainer_state["schedule"])
        step = ckpt.step
        log.info("resumed reward model from %s at step %d", ckpt.path, step)

    base_cfg = base_config(base_ckpt)
    last_eval: dict[str, float] = {}
    path = None

    def save(final: bool) -> str:
        rlhf_state = {
            "kind": "reward",
            "run_config": cfg.model_dump(mode="json"),
            "eval": last_eval,
            "filtered": safety.summary(),
            "finished": final,
        }
        trainer_state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        return str(save_run(cfg, step, rm.state_dict(), trainer_state, base_cfg, rlhf_state))

    rm.train()
    with make_progress(console, show_progress) as progress:
        task = progress.add_task("reward model", total=total, completed=step, status="")
        while step < total:
            idx = batch_indices(len(train_data), cfg.batch_size, cfg.seed, step)
            loss, c, r = reward_loss(rm, train_data.select(idx), cfg.reward)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(rm, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            acc = pairwise_accuracy(c.detach(), r.detach())
            loss_value = float(loss.detach())
            if step % cfg.log_every == 0:
                log.info(
                    "reward step %d loss %.4f acc %.3f grad_norm %.3f",
                    step,
                    loss_value,
                    acc,
                    grad_norm,
                )
            progress.update(task, advance=1, status=f"loss {loss_value:.3f} acc {acc:.2f}")
            if step % cfg.checkpoint_every == 0 and step < total:
                path = save(final=False)

    if eval_data is not None:
        last_eval = evaluate_reward_model(rm, eval_data, cfg.reward)
        log.info("reward model held-out accuracy %.3f", last_eval["accuracy"])
    if cfg.reward.normalise:
        ref = eval_data if eval_data is not None else train_data
        lengths = torch.cat((ref.chosen_lengths, ref.rejected_lengths))
        fit_reward_normalisation(rm, _stack_padded(ref), lengths)
    path = save(final=True)
    return RewardRunResult(step, last_eval, path, safety.summary(), time.perf_counter() - start)


def _pad_to(ids: Tensor, width: int, pad: int = 0) -> Tensor:
    if ids.shape[1] >= width:
        return ids
    out = torch.full((ids.shape[0], width), pad, dtype=ids.dtype)
    out[:, : ids.shape[1]] = ids
    return out


def _stack_padded(data: TokenizedPairs) -> Tensor:
    width = max(data.chosen_ids.shape[1], data.rejected_ids.shape[1])
    return torch.cat((_pad_to(data.chosen_ids, width), _pad_to(data.rejected_ids, width)))
