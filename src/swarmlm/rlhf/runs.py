"""Glue shared by the alignment runs: optimizer and warm-up, checkpoints in the trainer's
format, deterministic batch order (so a resumed run sees the same batches), progress bars."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from swarmlm.data import Tokenizer
from swarmlm.rlhf.config import PairDataSettings, RunSettings
from swarmlm.rlhf.preferences import (
    PreferencePair,
    TokenizedPairs,
    read_preferences,
    tokenize_pairs,
)
from swarmlm.rlhf.safety import SafetyFilter
from swarmlm.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from swarmlm.train.optim import build_adamw

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(
    module: nn.Module, cfg: RunSettings, total_steps: int | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The trainer's AdamW (norms and biases not decayed) with a linear warm-up, then
    ``cfg.lr_decay``. A decayed run ends near a low learning rate, so its last weights are not
    one noisy full-size step away from where they settled; decay needs ``total_steps``."""
    optimizer = build_adamw(module, cfg.optim)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.warmup_steps, cfg.lr_decay, total_steps)
    )


def lr_factor(warmup: int, decay: str, total_steps: int | None) -> Callable[[int], float]:
    """Multiplier of the base learning rate for the update after ``step`` scheduler steps."""
    if decay != "constant" and total_steps is None:
        raise ValueError(f"lr_decay={decay!r} needs the run's total step count")
    total = total_steps or 1

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        if decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def clip_gradients(module: nn.Module, max_norm: float | None) -> float:
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def save_run(
    cfg: RunSettings,
    step: int,
    model_state: dict[str, Tensor],
    trainer_state: dict[str, Any],
    base_config: dict[str, Any],
    rlhf_state: dict[str, Any],
) -> Path:
    """A checkpoint in the trainer's format: ``state.config`` keeps the base run config (so
    ``swarmlm generate`` and ``export-hf`` read policy checkpoints), ``state.rlhf`` holds
    the alignment run's kind, config and progress."""
    state = {"config": base_config, "rlhf": rlhf_state}
    snap = {k: v.detach().to("cpu", copy=True) for k, v in model_state.items()}
    trainer_state = {**trainer_state, "torch_rng": torch.get_rng_state()}
    path = save_checkpoint(cfg.out_dir, step, snap, trainer_state, state, cfg.keep_checkpoints)
    log.info("saved %s", path)
    return path


def resume_checkpoint(cfg: RunSettings, kind: str, resume: bool) -> Checkpoint | None:
    """The run's latest checkpoint when resuming; refuses a run directory of another kind."""
    if not resume:
        return None
    latest = latest_checkpoint(cfg.out_dir)
    if latest is None:
        log.info("no checkpoint in %s: starting fresh", cfg.out_dir)
        return None
    ckpt = load_checkpoint(latest)
    found = ckpt.state.get("rlhf", {}).get("kind")
    if found != kind:
        from swarmlm.train.checkpoint import CheckpointError

        raise CheckpointError(f"{ckpt.path} is a {found!r} run, not {kind!r} (state.rlhf.kind)")
    if "torch_rng" in ckpt.trainer_state:
        torch.set_rng_state(ckpt.trainer_state["torch_rng"])
    return ckpt


def split_pairs(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded train / held-out split (held-out gets at least one pair when fraction > 0)."""
    if fraction <= 0 or len(pairs) < 2:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pairs) * fraction))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def load_pair_data(
    cfg: PairDataSettings, tok: Tokenizer, safety: SafetyFilter, seed: int
) -> tuple[TokenizedPairs, TokenizedPairs | None]:
    """Train and held-out pairs of a reward or DPO run: read, safety-filtered, split (or the
    given eval file), tokenized. Raises ValueError when the filter leaves nothing to train."""
    pairs = safety.filter_pairs(read_preferences(cfg.train_file))
    if cfg.eval_file is not None:
        train_pairs, eval_pairs = pairs, safety.filter_pairs(read_preferences(cfg.eval_file))
    else:
        train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, seed)
    if not train_pairs:
        raise ValueError(f"{cfg.train_file}: no pairs left after the safety filter")

    def encode(ps: list[PreferencePair]) -> TokenizedPairs:
        return tokenize_pairs(
            ps, tok.encode, eos_id=tok.eos_id, pad_id=tok.pad_id, max_len=cfg.max_len
        )

    return encode(train_pairs), (encode(eval_pairs) if eval_pairs else None)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Indices of batch ``step``: epoch ``e`` is a permutation seeded by (seed, e), so the
    order depends only on the step number, and a resumed run continues exactly."""
    per_epoch = max(1, -(-n // batch_size))
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size]


def steps_for(n: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    total = max(1, -(-n // batch_size)) * epochs
    return min(total, max_steps) if max_steps is not None else total


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def make_progress(console: Console | None, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
    )
