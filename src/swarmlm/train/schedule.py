"""Learning-rate schedules as a pure function of the step, plus reduce-on-plateau.

The multiplier is recomputed from the step each time, so resuming needs only the step (and,
for plateau, the small state returned by :meth:`LRSchedule.state_dict`).
"""

from __future__ import annotations

import math
from typing import Any

from swarmlm.train.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, step: int, max_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) before plateau scaling."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind in ("constant", "plateau"):
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.kind == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Warmup + cosine/linear/constant, and reduce-on-plateau driven by validation loss."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float, max_steps: int) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.max_steps = max_steps
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0

    def lr(self, step: int) -> float:
        return self.base_lr * lr_multiplier(self.cfg, step, self.max_steps) * self.plateau_scale

    def observe(self, val_loss: float) -> bool:
        """Record a validation loss; returns True when the plateau rule lowered the rate."""
        if self.cfg.kind != "plateau":
            return False
        if self.best is None or val_loss < self.best - self.cfg.plateau_threshold:
            self.best = val_loss
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        if self.bad_evals > self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.bad_evals = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad": self.bad_evals,
            "max_steps": self.max_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad"])
        self.max_steps = int(state.get("max_steps", self.max_steps))
