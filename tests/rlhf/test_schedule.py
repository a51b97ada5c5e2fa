"""Learning-rate schedules of the alignment runs: warm-up, then constant or decayed to zero at
the run's last step (what a short reward-model run needs to end settled, not mid-jump)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from swarmlm.rlhf.config import RewardRunConfig
from swarmlm.rlhf.runs import build_optimizer


def _config(tmp_path: Path, **overrides: object) -> RewardRunConfig:
    return RewardRunConfig.model_validate(
        {
            "init_checkpoint": tmp_path / "lm",
            "train_file": tmp_path / "prefs.jsonl",
            "out_dir": tmp_path / "rm",
            "optim": {"lr": 1e-3, "weight_decay": 0.0},
            **overrides,
        }
    )


def _learning_rates(cfg: RewardRunConfig, total: int | None) -> list[float]:
    """The learning rate each of ``total`` (or 6) optimizer steps actually used."""
    module = torch.nn.Linear(2, 1)
    optimizer, schedule = build_optimizer(module, cfg, total)
    used = []
    for _ in range(total or 6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return used


def test_linear_decay_falls_from_the_base_rate_to_near_zero_after_warm_up(tmp_path: Path) -> None:
    lrs = _learning_rates(_config(tmp_path, warmup_steps=2, lr_decay="linear"), total=10)
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[2:] == pytest.approx([1e-3 * (8 - i) / 8 for i in range(8)])
    assert lrs[-1] == pytest.approx(1.25e-4)


def test_cosine_decay_is_half_way_down_at_mid_run(tmp_path: Path) -> None:
    lrs = _learning_rates(_config(tmp_path, lr_decay="cosine"), total=9)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(0.5e-3, rel=0.2)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_constant_schedule_keeps_the_rate_after_warm_up(tmp_path: Path) -> None:
    lrs = _learning_rates(_config(tmp_path, warmup_steps=4), total=None)
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_decay_without_a_step_count_and_unknown_decay_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total step count"):
        build_optimizer(torch.nn.Linear(2, 1), _config(tmp_path, lr_decay="linear"))
    with pytest.raises(ValidationError, match="lr_decay"):
        _config(tmp_path, lr_decay="exponential")
