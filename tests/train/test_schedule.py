from __future__ import annotations

import itertools

import pytest

from swarmlm.train.config import ScheduleConfig
from swarmlm.train.schedule import LRSchedule, lr_multiplier


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 60, 110) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 110, 110) == pytest.approx(0.1)
    values = [lr_multiplier(cfg, s, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_linear_and_constant_schedules() -> None:
    linear = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_multiplier(linear, 50, 100) == pytest.approx(0.5)
    constant = ScheduleConfig(kind="constant", warmup_steps=0)
    assert lr_multiplier(constant, 99, 100) == 1.0


def test_reduce_on_plateau_lowers_the_rate_after_patience_and_resumes_its_state() -> None:
    cfg = ScheduleConfig(kind="plateau", warmup_steps=0, plateau_patience=1, plateau_factor=0.5)
    sched = LRSchedule(cfg, base_lr=1.0, max_steps=100)
    assert not sched.observe(2.0)
    assert not sched.observe(2.0)  # first bad evaluation: within patience
    assert sched.observe(2.1)  # second: reduce
    assert sched.lr(5) == pytest.approx(0.5)
    restored = LRSchedule(cfg, base_lr=1.0, max_steps=100)
    restored.load_state_dict(sched.state_dict())
    assert restored.lr(5) == pytest.approx(0.5)
    assert not restored.observe(1.0)  # improvement resets the count
