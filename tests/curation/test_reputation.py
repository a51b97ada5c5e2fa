"""Reputation (Beta-smoothed accuracy) and the points ledger."""

from __future__ import annotations

import numpy as np
import pytest

from swarmlm.curation.agreement import MISSING, QualityInputError
from swarmlm.curation.consensus import majority_vote, reputation_weighted_vote
from swarmlm.curation.reputation import (
    AgreementCounts,
    PointsPolicy,
    agreement_counts,
    annotation_points,
    leaderboard_order,
    leave_one_out_majority,
    points_totals,
    reputation_scores,
)


def simulate_crowd(seed: int, n_items: int, n_raters: int) -> tuple[np.ndarray, ...]:
    """5 labels per task, 3 classes; 60% of annotators right 90%, 30% right 70%, 10% random.

    Returns ``items, raters, labels, truth, accuracy`` (accuracy NaN for spammers).
    """
    rng = np.random.default_rng(seed)
    accuracy = np.full(n_raters, np.nan)
    accuracy[: int(0.6 * n_raters)] = 0.9
    accuracy[int(0.6 * n_raters) : int(0.9 * n_raters)] = 0.7
    accuracy = accuracy[rng.permutation(n_raters)]
    truth = rng.integers(0, 3, n_items)
    items = np.repeat(np.arange(n_items), 5)
    raters = np.concatenate([rng.choice(n_raters, 5, replace=False) for _ in range(n_items)])
    right = rng.random(items.size) < np.nan_to_num(accuracy[raters], nan=1 / 3)
    wrong = (truth[items] + rng.integers(1, 3, items.size)) % 3
    labels = np.where(right, truth[items], wrong)
    return items, raters, labels, truth, accuracy


def _counts(matches: list[float], checked: list[float]) -> AgreementCounts:
    return AgreementCounts(np.asarray(matches, dtype=float), np.asarray(checked, dtype=float))


def test_a_newcomer_starts_exactly_at_the_prior_mean() -> None:
    rep = reputation_scores(_counts([0, 9], [0, 10]), prior_mean=0.7, prior_strength=10)
    assert rep.score[0] == pytest.approx(0.7)
    assert rep.evidence[0] == 0
    assert rep.sd[0] > rep.sd[1]  # and is the least certain


def test_one_lucky_or_unlucky_answer_barely_moves_reputation_but_a_record_does() -> None:
    rep = reputation_scores(
        _counts([1, 0, 50, 0], [1, 1, 50, 50]), prior_mean=0.7, prior_strength=10
    )
    lucky, unlucky, expert, spammer = rep.score
    assert 0.7 < lucky < 0.75
    assert 0.6 < unlucky < 0.7
    assert expert > 0.94
    assert spammer < 0.15


def test_empirical_prior_is_the_pooled_success_rate() -> None:
    rep = reputation_scores(_counts([8, 6, 0], [10, 10, 0]), prior_strength=4)
    pooled = (14 + 1) / (20 + 2)
    assert rep.score[2] == pytest.approx(pooled)


def test_consensus_agreement_counts_for_less_than_gold() -> None:
    gold = _counts([0, 0], [0, 0])
    consensus = _counts([20, 20], [20, 20])
    half = reputation_scores(gold, consensus, prior_mean=0.5, consensus_weight=0.5)
    full = reputation_scores(gold, consensus, prior_mean=0.5, consensus_weight=1.0)
    by_gold = reputation_scores(_counts([20, 20], [20, 20]), prior_mean=0.5)
    assert half.score[0] < full.score[0] == pytest.approx(by_gold.score[0])
    assert half.evidence[0] == pytest.approx(10.0)


def test_agreement_counts_skip_annotations_without_a_reference() -> None:
    counts = agreement_counts(
        raters=[0, 0, 1, 1, 1], labels=[2, 1, 0, 0, 1], reference=[2, MISSING, 0, 1, 1], n_raters=3
    )
    assert counts.matches.tolist() == [1.0, 2.0, 0.0]
    assert counts.checked.tolist() == [1.0, 3.0, 0.0]


def test_leave_one_out_majority_never_judges_an_annotator_by_their_own_vote() -> None:
    # item 0: votes 1, 1, 2 -> each 1-voter is checked against the other (1 vs 2: tie -> none)
    # item 1: a lone vote has nobody to agree with
    ref = leave_one_out_majority([0, 0, 0, 1], [1, 1, 2, 0])
    assert ref.tolist() == [MISSING, MISSING, 1, MISSING]
    ref = leave_one_out_majority([0, 0, 0, 0], [1, 1, 1, 2])
    assert ref.tolist() == [1, 1, 1, 1]


def test_reputation_from_gold_tasks_makes_weighted_vote_beat_majority_vote() -> None:
    items, raters, labels, truth, accuracy = simulate_crowd(seed=21, n_items=1500, n_raters=60)
    n_gold = 150  # 10% honeypots with known answers
    gold = np.full(1500, MISSING)
    gold[:n_gold] = truth[:n_gold]
    gold_counts = agreement_counts(raters, labels, gold[items], n_raters=60)
    loo = leave_one_out_majority(items, labels, n_classes=3)
    agree = agreement_counts(raters, labels, loo, n_raters=60)
    rep = reputation_scores(gold_counts, agree)
    spammers = np.isnan(accuracy)
    good = accuracy == 0.9
    assert rep.score[good].min() > rep.score[spammers].max()
    weighted = reputation_weighted_vote(items, raters, labels, rep.score)
    plain = majority_vote(items, labels)
    rest = slice(n_gold, None)
    weighted_error = np.mean(weighted.winner[rest] != truth[rest])
    plain_error = np.mean(plain.winner[rest] != truth[rest])
    assert weighted_error < 0.8 * plain_error, (weighted_error, plain_error)


def test_points_are_itemised_per_annotation_and_never_negative() -> None:
    policy = PointsPolicy(per_annotation=1, consensus_bonus=2, gold_bonus=3, gold_penalty=5)
    pts = annotation_points(
        raters=[0, 0, 1, 1],
        labels=[1, 2, 1, 0],
        consensus_reference=[1, 1, MISSING, MISSING],
        gold_reference=[MISSING, MISSING, 1, 2],
        policy=policy,
    )
    assert pts.base.tolist() == [1, 1, 1, 1]
    assert pts.consensus.tolist() == [2, 0, 0, 0]
    assert pts.gold.tolist() == [0, 0, 3, -5]
    assert pts.total.tolist() == [3, 1, 4, 0]
    assert points_totals([0, 0, 1, 1], pts.total, n_raters=3).tolist() == [4, 4, 0]


def test_annotators_below_the_reputation_floor_earn_no_base_points() -> None:
    policy = PointsPolicy(min_reputation_for_base=0.5)
    pts = annotation_points(
        raters=[0, 1],
        labels=[0, 0],
        consensus_reference=[MISSING, MISSING],
        gold_reference=[MISSING, MISSING],
        reputation=[0.9, 0.3],
        policy=policy,
    )
    assert pts.total.tolist() == [1, 0]


def test_leaderboard_orders_by_points_then_reputation_then_index() -> None:
    order = leaderboard_order([5, 9, 5, 5, 0], reputation=[0.6, 0.1, 0.8, 0.6, 0.99])
    assert order.tolist() == [1, 2, 0, 3, 4]
    assert leaderboard_order([2, 2, 3]).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: reputation_scores(_counts([2], [1])), "exceed"),
        (lambda: reputation_scores(_counts([-1], [1])), r"gold.matches\[0\]"),
        (lambda: reputation_scores(_counts([1], [1]), _counts([1, 1], [1, 1])), "same 1"),
        (lambda: reputation_scores(_counts([1], [1]), prior_mean=1.0), "prior_mean"),
        (lambda: reputation_scores(_counts([1], [1]), prior_strength=0), "prior_strength"),
        (lambda: reputation_scores(_counts([1], [1]), consensus_weight=2), "consensus_weight"),
        (lambda: agreement_counts([0], [1], [-3]), r"reference\[0\] = -3"),
        (lambda: agreement_counts([0, 1], [1], [1]), "equal length"),
        (lambda: PointsPolicy(gold_bonus=-1), "gold_bonus"),
        (
            lambda: annotation_points(
                [0],
                [0],
                consensus_reference=[0],
                gold_reference=[0],
                policy=PointsPolicy(min_reputation_for_base=0.5),
            ),
            "reputation is required",
        ),
        (lambda: points_totals([0, 1], [1.5, 2.0]), "integer"),
        (lambda: leaderboard_order([1, 2], reputation=[0.5]), "reputation"),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(call: object, message: str) -> None:
    with pytest.raises(QualityInputError, match=message):
        call()  # type: ignore[operator]
