"""Direct preference optimisation (and IPO) with precomputed reference log-probabilities.

The reference model's summed response log-probs are computed once, before training, and kept
as two (n,) tensors; the reference is then freed, so training holds one model in memory and
spends no forward passes on the reference.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from swarmlm.model import Transformer
from swarmlm.rlhf.config import DPOConfig, DPORunConfig
from swarmlm.rlhf.losses import dpo_loss
from swarmlm.rlhf.modeling import (
    base_config,
    check_same_vocab,
    load_language_model,
    response_logprobs,
    tokenizer_for,
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


def pair_logprobs(
    model: Transformer, batch: TokenizedPairs, *, average: bool = False
) -> tuple[Tensor, Tensor]:
    """Summed (or, with ``average``, per-token mean) response log-probs: (chosen, rejected)."""
    n = len(batch)
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    ids = torch.zeros((2 * n, width), dtype=torch.long)
    ids[:n, : batch.chosen_ids.shape[1]] = batch.chosen_ids
    ids[n:, : batch.rejected_ids.shape[1]] = batch.rejected_ids
    prompt = torch.cat((batch.prompt_lengths, batch.prompt_lengths))
    lengths = torch.cat((batch.chosen_lengths, batch.rejected_lengths))
    total, count = response_logprobs(model, ids, prompt, lengths)
    if average:
        total = total / count.clamp(min=1)
    return total[:n], total[n:]


@torch.no_grad()
def precompute_reference(
    ref: Transformer, data: TokenizedPairs, *, average: bool, batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair, in data order: ((n,), (n,))."""
    ref.eval()
    chosen, rejected = [], []
    for i in range(0, len(data), batch_size):
        c, r = pair_logprobs(
            ref, data.select(torch.arange(i, min(len(data), i + batch_size))), average=average
        )
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def dpo_batch_loss(
    policy: Transformer,
    batch: TokenizedPairs,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    cfg: DPOConfig,
) -> tuple[Tensor, dict[str, float]]:
    pc, pr = pair_logprobs(policy, batch, average=cfg.loss_type == "ipo")
    loss, rc, rr = dpo_loss(
        pc,
        pr,
        ref_chosen,
        ref_rejected,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
    )
    stats = {
        "loss": float(loss.detach()),
        "reward_accuracy": float((rc > rr).float().mean()),
        "reward_margin": float((rc - rr).mean()),
        "chosen_logp": float(pc.detach().mean()),
    }
    return loss, stats


@torch.no_grad()
def evaluate_dpo(
    policy: Transformer,
    data: TokenizedPairs,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    cfg: DPOConfig,
    batch_size: int = 16,
) -> dict[str, float]:
    was = policy.training
    policy.eval()
    totals: dict[str, float] = {}
    try:
        for i in range(0, len(data), batch_size):
            idx = torch.arange(i, min(len(data), i + batch_size))
            _, stats = dpo_batch_loss(
                policy, data.select(idx), ref_chosen[idx], ref_rejected[idx], cfg
            )
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(idx)
    finally:
        policy.train(was)
    return {k: v / len(data) for k, v in totals.items()}


def train_dpo(
    cfg: DPORunConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The whole DPO run: returns a summary with held-out metrics and the checkpoint path."""
    start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_all(cfg.seed)
    policy, base_ckpt = load_language_model(cfg.init_checkpoint)
    tok = tokenizer_for(base_ckpt, cfg.tokenizer)
    safety = build_safety_filter(cfg.safety)
    train_data, eval_data = load_pair_data(cfg, tok, safety, cfg.seed)
    average = cfg.dpo.loss_type == "ipo"
    ref_path = cfg.reference_checkpoint or cfg.init_checkpoint
    ref, _ = load_language_model(ref_path)
    check_same_vocab(policy, str(cfg.init_checkpoint), ref, str(ref_path))
    ref_c, ref_r = precompute_reference(ref, train_data, average=average)
    eval_ref = precompute_reference(ref, eval_data, average=average) if eval_data else None
    del ref

    total = steps_for(len(train_data), cfg.batch_size, cfg.epochs, cfg.max_steps)
    optimizer, schedule = build_optimizer(policy, cfg, total)
    step = 0
    ckpt = resume_checkpoint(cfg, "dpo", resume)
    if ckpt is not None:
        policy.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.trainer_state["optimizer"])
        schedule.load_state_dict(ckpt.trainer_state["schedule"])
        step = ckpt.step
    base_cfg = base_config(base_ckpt)
    last_eval: dict[str, float] = {}

    def save(final: bool) -> str:
        rlhf_state = {
            "kind": "dpo",
            "run_config": cfg.model_dump(mode="json"),
            "eval": last_eval,
            "filtered": safety.summary(),
            "finished": final,
        }
        trainer_state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        return str(save_run(cfg, step, policy.state_dict(), trainer_state, base_cfg, rlhf_state))

    policy.eval()  # dropout is already 0; eval() keeps it so whatever the config says
    with make_progress(console, show_progress) as progress:
        task = progress.add_task("dpo", total=total, completed=step, status="")
        while step < total:
            idx = batch_indices(len(train_data), cfg.batch_size, cfg.seed, step)
            loss, stats = dpo_batch_loss(
                policy, train_data.select(idx), ref_c[idx], ref_r[idx], cfg.dpo
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] = clip_gradients(policy, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            if step % cfg.log_every == 0:
                log.info("dpo step %d %s", step, stats)
            progress.update(
                task,
                advance=1,
                status=f"loss {stats['loss']:.3f} acc {stats['reward_accuracy']:.2f}",
            )
            if step % cfg.checkpoint_every == 0 and step < total:
                save(final=False)
    if eval_data is not None and eval_ref is not None:
        last_eval = evaluate_dpo(policy, eval_data, eval_ref[0], eval_ref[1], cfg.dpo)
    path = save(final=True)
    return {
        "step": step,
        "checkpoint": path,
        "filtered": safety.summary(),
        "seconds": time.perf_counter() - start,
        **{f"eval_{k}": v for k, v in last_eval.items()},
    }
