"""The swarm-agreed data schedule: every peer derives the same stage and weights from the
decided reports, and a minority of liars cannot steer them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from swarmlm.data.mixing import MixingConfig
from swarmlm.swarm.data_schedule import AgreedDataSchedule, DataReport
from swarmlm.swarm.errors import StateSyncError

TYPES = ["code", "math", "prose"]
PRIOR = np.array([0.5, 0.3, 0.2])


def schedule(**kw: object) -> AgreedDataSchedule:
    cfg = MixingConfig(mode="online", curriculum=True, stages=5, patience=3, **kw)  # type: ignore[arg-type]
    return AgreedDataSchedule(cfg, rounds=50, types=TYPES, prior=PRIOR)


def honest(loss: float) -> DataReport:
    return DataReport(loss, (loss + 1.0, loss, loss - 0.5), (4, 4, 4))


def test_the_stage_advances_when_the_median_loss_drops() -> None:
    s = schedule(advance_drop=0.05, max_steps=40)
    assert s.stage == 0
    assert s.cap() == pytest.approx(0.05)
    for r, loss in enumerate([5.0, 4.0, 3.0, 2.0], start=1):
        s.observe(r, [honest(loss)] * 4)
    assert s.stage >= 1
    assert s.cap() > 0.05


def test_a_minority_of_liars_cannot_move_the_stage() -> None:
    """3 honest peers whose loss does not fall, 1 liar reporting a collapsing loss: with the
    median the stage stays where the honest reports keep it; a mean would have advanced it."""
    s = schedule(advance_drop=0.05, max_steps=40)
    for r in range(1, 10):
        s.observe(r, [honest(5.0), honest(5.0), honest(5.0), DataReport(0.01, (), ())])
    # the honest loss never improves: only patience (3 rounds without a new best) advances it
    patience_only = schedule(advance_drop=0.05, max_steps=40)
    for r in range(1, 10):
        patience_only.observe(r, [honest(5.0)] * 3)
    assert s.stage == patience_only.stage


def test_weights_move_towards_the_types_with_high_loss_and_ignore_a_liar() -> None:
    s = schedule()
    before = s.weights()
    assert before is not None
    liar = DataReport(1.0, (0.0, 100.0, 0.0), (4, 4, 4))  # claims math is terrible
    for r in range(1, 6):
        s.observe(r, [honest(3.0)] * 3 + [liar])
    clean = schedule()
    for r in range(1, 6):
        clean.observe(r, [honest(3.0)] * 3)
    after, ref = s.weights(), clean.weights()
    assert after is not None
    assert ref is not None
    np.testing.assert_array_equal(after, ref)  # the median of 4 with 3 identical is theirs
    assert after[0] > before[0]  # code had the highest honest loss


def test_reports_of_the_wrong_length_or_non_finite_are_ignored() -> None:
    s = schedule()
    s.observe(1, [DataReport(float("nan"), (1.0,), (1,)), DataReport(float("inf"))])
    assert s.stage == 0
    assert s.curriculum is not None
    assert s.curriculum.ema is None


def test_the_state_round_trips_exactly_through_json_scalars() -> None:
    s = schedule(advance_drop=0.05, max_steps=40)
    for r, loss in enumerate([5.0, 4.1, 3.3, 3.2, 3.25], start=1):
        s.observe(r, [honest(loss), honest(loss + 0.1), honest(loss - 0.1)])
    text = json.dumps(s.scalars(), sort_keys=True)
    other = schedule(advance_drop=0.05, max_steps=40)
    other.load(json.loads(text))
    assert other.scalars() == s.scalars()
    assert other.stage == s.stage
    np.testing.assert_array_equal(other.weights(), s.weights())  # type: ignore[arg-type]
    # and they go on identically
    for r in (6, 7):
        s.observe(r, [honest(3.0)] * 3)
        other.observe(r, [honest(3.0)] * 3)
    assert other.scalars() == s.scalars()


def test_a_state_naming_a_stage_past_the_last_is_refused() -> None:
    s = schedule()
    with pytest.raises(StateSyncError, match=r"data\.stage"):
        s.load({"data.stage": 5})


def test_without_a_schedule_nothing_is_stored() -> None:
    s = AgreedDataSchedule(MixingConfig(mode="static"), rounds=10, types=TYPES, prior=PRIOR)
    assert not s.observe(1, [honest(3.0)])
    assert s.scalars() == {}
    assert s.cap() == 1.0
    assert s.weights() is None
