"""Consensus: votes, Dawid-Skene (against crowd-kit and in simulation), medians, preferences."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.curation.agreement import MISSING, QualityInputError
from swarmlm.curation.consensus import (
    PairOutcome,
    TaskStatus,
    bradley_terry,
    dawid_skene,
    finalisation_decision,
    majority_vote,
    plackett_luce,
    ranking_pairs,
    reputation_weighted_vote,
    weighted_median,
    weighted_vote,
)


@dataclass
class Crowd:
    """A simulated labelling campaign: who labelled what, and the hidden truth."""

    items: npt.NDArray[np.int64]
    raters: npt.NDArray[np.int64]
    labels: npt.NDArray[np.int64]
    truth: npt.NDArray[np.int64]
    accuracy: npt.NDArray[np.float64]  # NaN for spammers


def simulate_crowd(
    seed: int, n_items: int = 1000, n_raters: int = 50, per_item: int = 5, n_classes: int = 3
) -> Crowd:
    """60% good annotators (0.9), 30% mediocre (0.7), 10% spammers (half constant, half random).

    A wrong answer is a uniformly chosen wrong class.
    """
    rng = np.random.default_rng(seed)
    n_good, n_mid = int(0.6 * n_raters), int(0.3 * n_raters)
    accuracy = np.full(n_raters, np.nan)
    accuracy[:n_good], accuracy[n_good : n_good + n_mid] = 0.9, 0.7
    accuracy = accuracy[rng.permutation(n_raters)]
    truth = rng.integers(0, n_classes, n_items)
    items = np.repeat(np.arange(n_items), per_item)
    raters = np.concatenate(
        [rng.choice(n_raters, per_item, replace=False) for _ in range(n_items)]
    ).astype(np.int64)
    p = accuracy[raters]
    right = rng.random(items.size) < np.nan_to_num(p)
    wrong = (truth[items] + rng.integers(1, n_classes, items.size)) % n_classes
    labels = np.where(right, truth[items], wrong)
    spam = np.isnan(p)
    constant = spam & (raters % 2 == 0)
    labels[constant] = 0
    random_spam = spam & ~constant
    labels[random_spam] = rng.integers(0, n_classes, int(random_spam.sum()))
    return Crowd(items, raters, labels.astype(np.int64), truth, accuracy)


# --------------------------------------------------------------------------- votes


def test_majority_vote_returns_winner_and_its_vote_share() -> None:
    vote = majority_vote([0, 0, 0, 1, 1, 1, 1], [2, 2, 0, 1, 1, 1, 0], n_classes=3)
    assert vote.winner.tolist() == [2, 1]
    assert vote.share.tolist() == pytest.approx([2 / 3, 3 / 4])
    assert vote.n_votes.tolist() == [3, 4]
    assert not vote.tied.any()


def test_majority_vote_breaks_ties_towards_the_lowest_class_whatever_the_order() -> None:
    items = np.array([0, 0, 0, 0, 1, 1])
    labels = np.array([2, 1, 2, 1, 0, 2])
    for perm in (np.arange(6), np.array([5, 3, 1, 0, 2, 4])):
        vote = majority_vote(items[perm], labels[perm])
        assert vote.winner.tolist() == [1, 0]
        assert vote.tied.tolist() == [True, True]
        assert vote.share.tolist() == pytest.approx([0.5, 0.5])


def test_items_without_votes_have_no_winner() -> None:
    vote = majority_vote([1, 1], [0, 0], n_items=3, n_classes=2)
    assert vote.winner.tolist() == [MISSING, 0, MISSING]
    assert vote.share.tolist() == [0.0, 1.0, 0.0]
    assert vote.n_votes.tolist() == [0, 2, 0]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=60), st.randoms()
)
def test_vote_results_do_not_depend_on_the_order_annotations_arrived_in(
    votes: list[tuple[int, int]], shuffler: random.Random
) -> None:
    items, labels = np.array(votes).T
    shuffled = list(votes)
    shuffler.shuffle(shuffled)
    items2, labels2 = np.array(shuffled).T
    weights = (items * 7 + labels * 3) % 5 / 4.0  # a weight per (item, label), order-free
    weights2 = (items2 * 7 + labels2 * 3) % 5 / 4.0
    for a, b in (
        (
            majority_vote(items, labels, n_items=6, n_classes=4),
            majority_vote(items2, labels2, n_items=6, n_classes=4),
        ),
        (
            weighted_vote(items, labels, weights, n_items=6, n_classes=4),
            weighted_vote(items2, labels2, weights2, n_items=6, n_classes=4),
        ),
    ):
        assert a.winner.tolist() == b.winner.tolist()
        np.testing.assert_allclose(a.share, b.share)
        assert a.tied.tolist() == b.tied.tolist()


def test_weighted_vote_breaks_weight_ties_by_vote_count() -> None:
    vote = weighted_vote([0, 0, 0], [1, 0, 0], weights=[2.0, 1.0, 1.0])
    assert vote.winner.tolist() == [0]
    assert vote.tied.tolist() == [True]


def test_one_trusted_annotator_outvotes_two_chance_level_annotators() -> None:
    # annotator 0 is right 95% of the time; 1 and 2 are at chance for 3 classes
    reputation = np.array([0.95, 1 / 3, 0.30])
    vote = reputation_weighted_vote([0, 0, 0], [0, 1, 2], [2, 1, 1], reputation, n_classes=3)
    assert vote.winner.tolist() == [2]
    assert vote.share.tolist() == [1.0]  # chance-level annotators weigh nothing
    plain = majority_vote([0, 0, 0], [2, 1, 1])
    assert plain.winner.tolist() == [1]
    linear = reputation_weighted_vote(
        [0, 0, 0], [0, 1, 2], [2, 1, 1], reputation, n_classes=3, scheme="linear"
    )
    # linear weights still let chance-level votes count: 0.95 against 1/3 + 0.30
    assert linear.winner.tolist() == [2]
    assert linear.share[0] == pytest.approx(0.95 / (0.95 + 1 / 3 + 0.30))


# --------------------------------------------------------------------------- Dawid-Skene


@pytest.mark.filterwarnings("ignore:The (inplace|copy) keyword")
def test_dawid_skene_matches_crowd_kit_step_for_step_on_the_same_annotations() -> None:
    pd = pytest.importorskip("pandas")
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    crowd = simulate_crowd(seed=3, n_items=250, n_raters=30)
    # Same initialisation (soft majority vote) and the same 30 EM steps on both sides; a
    # fixed step count avoids comparing two different stopping rules.
    ours = dawid_skene(crowd.items, crowd.raters, crowd.labels, n_classes=3, max_iter=30, tol=0)
    assert ours.iterations == 30
    frame = pd.DataFrame({"task": crowd.items, "worker": crowd.raters, "label": crowd.labels})
    ref = crowdkit.DawidSkene(n_iter=30, tol=-1.0).fit(frame)
    probas = ref.probas_.sort_index().sort_index(axis=1).to_numpy()
    np.testing.assert_allclose(ours.posteriors, probas, atol=1e-8)
    np.testing.assert_allclose(ours.class_priors, ref.priors_.sort_index().to_numpy(), atol=1e-8)
    errors = ref.errors_  # rows (worker, observed), columns true class
    for worker in range(30):
        theirs = errors.loc[worker].reindex(range(3)).fillna(0.0)[[0, 1, 2]].to_numpy().T
        np.testing.assert_allclose(ours.confusion[worker], theirs, atol=1e-8)
    assert (ours.labels == ref.labels_.sort_index().to_numpy()).all()


def test_dawid_skene_error_is_well_below_majority_vote_error_in_simulation() -> None:
    crowd = simulate_crowd(seed=11, n_items=1500, n_raters=60)
    mv = majority_vote(crowd.items, crowd.labels, n_classes=3)
    ds = dawid_skene(crowd.items, crowd.raters, crowd.labels, n_classes=3)
    single_error = float(np.mean(crowd.labels != crowd.truth[crowd.items]))
    mv_error = float(np.mean(mv.winner != crowd.truth))
    ds_error = float(np.mean(ds.labels != crowd.truth))
    assert ds.converged
    assert single_error > 0.15
    assert ds_error <= 0.7 * mv_error, (ds_error, mv_error)
    assert ds_error <= 0.4 * single_error
    # and the confusion matrices recover who is good: diagonal mean ~ true accuracy
    honest = ~np.isnan(crowd.accuracy)
    estimated = np.einsum("rcc->r", ds.confusion) / 3
    assert np.abs(estimated[honest] - crowd.accuracy[honest]).mean() < 0.05


def test_gold_tasks_let_dawid_skene_decode_a_colluding_majority() -> None:
    # three annotators always answer (truth + 1) % 3, two always answer the truth: without
    # anchors the colluders look right; gold tasks reveal their permutation.
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 3, 200)
    items = np.repeat(np.arange(200), 5)
    raters = np.tile(np.arange(5), 200)
    labels = np.where(raters < 3, (truth[items] + 1) % 3, truth[items])
    unanchored = dawid_skene(items, raters, labels, n_classes=3)
    assert np.mean(unanchored.labels == truth) < 0.05
    gold = np.arange(20)
    anchored = dawid_skene(
        items, raters, labels, n_classes=3, gold_items=gold, gold_labels=truth[gold]
    )
    assert (anchored.labels == truth).all()
    assert anchored.confusion[0, 0, 1] == pytest.approx(1.0, abs=1e-6)


def test_dawid_skene_handles_unannotated_items_and_idle_annotators() -> None:
    result = dawid_skene([0, 0, 2, 2], [0, 1, 0, 1], [1, 1, 0, 0], n_items=4, n_raters=3)
    assert result.labels.tolist() == [1, MISSING, 0, MISSING]
    np.testing.assert_allclose(result.posteriors[1], result.class_priors)
    np.testing.assert_allclose(result.posteriors.sum(axis=1), 1.0)
    np.testing.assert_allclose(result.confusion[2], 0.5)  # annotator 2 never answered
    empty = dawid_skene([], [], [], n_items=2, n_raters=1, n_classes=3)
    assert empty.labels.tolist() == [MISSING, MISSING]
    assert empty.posteriors.shape == (2, 3)


def test_dawid_skene_stops_at_max_iter_and_says_it_did_not_converge() -> None:
    crowd = simulate_crowd(seed=2, n_items=300, n_raters=20)
    result = dawid_skene(crowd.items, crowd.raters, crowd.labels, max_iter=2, tol=1e-15)
    assert result.iterations == 2
    assert not result.converged


def test_confusion_prior_keeps_sparse_annotators_away_from_certainty() -> None:
    items, raters, labels = [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 1, 1]
    plain = dawid_skene(items, raters, labels)
    smoothed = dawid_skene(items, raters, labels, confusion_prior=1.0)
    assert plain.confusion.max() > 0.999
    assert smoothed.confusion.max() < 0.9


# --------------------------------------------------------------------------- ratings


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.floats(-100, 100, allow_nan=False)), min_size=1, max_size=40
    )
)
def test_weighted_median_with_equal_weights_is_the_ordinary_median(
    ratings: list[tuple[int, float]],
) -> None:
    items = np.array([i for i, _ in ratings])
    values = np.array([v for _, v in ratings])
    got = weighted_median(items, values, n_items=5)
    for item in range(5):
        mine = values[items == item]
        if mine.size:
            assert got[item] == pytest.approx(float(np.median(mine)), rel=1e-12, abs=1e-12)
        else:
            assert math.isnan(got[item])


def test_weighted_median_follows_the_weight_and_ignores_an_outlier() -> None:
    # item 0: a heavy rater at 2 outweighs two light raters at 5
    # item 1: one extreme outlier does not drag the median (a mean would move to 22)
    got = weighted_median(
        [0, 0, 0, 1, 1, 1, 1], [2, 5, 5, 3, 3, 4, 100], weights=[3, 1, 1, 1, 1, 1, 1]
    )
    assert got.tolist() == [2.0, 3.5]
    assert weighted_median([0, 0], [1, 9], weights=[0, 1]).tolist() == [9.0]


# --------------------------------------------------------------------------- preferences


def _bt_neg_log_posterior(
    log_s: npt.NDArray[np.float64],
    a: npt.NDArray[np.int64],
    b: npt.NDArray[np.int64],
    score_a: npt.NDArray[np.float64],
    prior: float,
) -> float:
    s = np.exp(log_s)
    ll = np.sum(score_a * log_s[a] + (1 - score_a) * log_s[b] - np.log(s[a] + s[b]))
    # log density of Gamma(shape 1 + prior, rate prior) at s, up to a constant; the mode in s
    # (not in log s) is what the MM iteration finds, so no Jacobian term
    lp = np.sum(prior * log_s - prior * s)
    return float(-(ll + lp))


def test_bradley_terry_reaches_the_maximum_of_its_posterior() -> None:
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    n = 8
    a = rng.integers(0, n, 120)
    b = (a + rng.integers(1, n, 120)) % n
    outcome = rng.choice([0, 1, 2, 3], size=120, p=[0.45, 0.35, 0.1, 0.1])
    fit = bradley_terry(a, b, outcome, n_players=n, prior=0.5)
    assert fit.converged
    score_a = np.where(outcome == 0, 1.0, np.where(outcome == 1, 0.0, 0.5))
    best = optimize.minimize(
        _bt_neg_log_posterior, np.zeros(n), args=(a, b, score_a, 0.5), method="BFGS", tol=1e-12
    )
    np.testing.assert_allclose(fit.score, best.x, atol=1e-5)


def test_bradley_terry_recovers_the_true_order_of_responses() -> None:
    rng = np.random.default_rng(1)
    true_score = np.linspace(-2, 2, 10)
    a = rng.integers(0, 10, 3000)
    b = (a + rng.integers(1, 10, 3000)) % 10
    p_a = 1 / (1 + np.exp(true_score[b] - true_score[a]))
    outcome = np.where(rng.random(3000) < p_a, PairOutcome.FIRST, PairOutcome.SECOND)
    fit = bradley_terry(a, b, outcome)
    assert np.argsort(fit.score).tolist() == list(range(10))
    centred = fit.score - fit.score.mean()
    np.testing.assert_allclose(centred, true_score, atol=0.25)
    assert fit.win_probability(9, 0) > 0.95


def test_ties_and_both_bad_pull_strengths_together_unless_both_bad_is_ignored() -> None:
    a, b = [0, 0, 0, 0], [1, 1, 1, 1]
    wins = bradley_terry(a, b, [PairOutcome.FIRST] * 4)
    ties = bradley_terry(a, b, [PairOutcome.TIE] * 4)
    assert wins.strength[0] > wins.strength[1]
    assert ties.strength[0] == pytest.approx(ties.strength[1])
    mixed = [PairOutcome.FIRST, PairOutcome.BOTH_BAD, PairOutcome.BOTH_BAD, PairOutcome.BOTH_BAD]
    as_tie = bradley_terry(a, b, mixed)
    ignored = bradley_terry(a, b, mixed, both_bad="ignore")
    only_win = bradley_terry([0], [1], [PairOutcome.FIRST])
    np.testing.assert_allclose(ignored.strength, only_win.strength)
    assert as_tie.win_probability(0, 1) < ignored.win_probability(0, 1)


def test_unbeaten_and_never_compared_responses_get_finite_neutral_strengths() -> None:
    fit = bradley_terry([0, 0, 0], [1, 1, 1], [0, 0, 0], n_players=3)
    assert np.all(np.isfinite(fit.score))
    assert fit.strength[2] == pytest.approx(1.0)  # prior mode: a newcomer is average
    assert fit.strength[0] > 1.0 > fit.strength[1]


def test_plackett_luce_on_pairs_equals_bradley_terry() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, 80)
    b = (a + rng.integers(1, 6, 80)) % 6
    first_wins = rng.random(80) < 0.6
    rankings = np.where(first_wins[:, None], np.c_[a, b], np.c_[b, a])
    pl = plackett_luce(rankings, n_players=6)
    bt = bradley_terry(a, b, np.where(first_wins, 0, 1), n_players=6)
    np.testing.assert_allclose(pl.strength, bt.strength, rtol=1e-7)


def test_plackett_luce_recovers_order_from_rankings_of_varying_length() -> None:
    rng = np.random.default_rng(3)
    true_score = np.linspace(-1.5, 1.5, 8)
    rows = []
    for _ in range(600):
        k = int(rng.integers(2, 5))
        chosen = rng.choice(8, k, replace=False)
        # Gumbel trick: sorting score + Gumbel noise samples a Plackett-Luce ranking
        order = chosen[np.argsort(-(true_score[chosen] + rng.gumbel(size=k)))]
        rows.append(np.r_[order, np.full(4 - k, -1)])
    fit = plackett_luce(np.array(rows))
    assert fit.converged
    assert np.argsort(fit.score).tolist() == list(range(8))
    a, b, outcome = ranking_pairs(np.array(rows))
    assert a.size == sum(len(r[r >= 0]) * (len(r[r >= 0]) - 1) // 2 for r in rows)
    pairwise = bradley_terry(a, b, outcome, n_players=8)
    assert np.argsort(pairwise.score).tolist() == list(range(8))


# --------------------------------------------------------------------------- finalisation


def test_finalisation_finalises_on_agreement_asks_for_more_and_gives_up_at_the_cap() -> None:
    decision = finalisation_decision(
        [1.0, 0.6, 0.6, 0.9, float("nan"), 0.5],
        [3, 3, 5, 1, 2, 4],
        threshold=0.8,
        min_annotations=3,
        max_annotations=5,
    )
    assert decision.status.tolist() == [
        TaskStatus.FINALISED,
        TaskStatus.COLLECTING,
        TaskStatus.EXHAUSTED,
        TaskStatus.COLLECTING,  # agreement alone is not enough below the minimum
        TaskStatus.COLLECTING,
        TaskStatus.COLLECTING,
    ]
    assert decision.more_needed.tolist() == [0, 1, 0, 2, 1, 1]


def test_vote_shares_feed_the_finalisation_rule() -> None:
    vote = majority_vote([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 1, 2])
    decision = finalisation_decision(
        vote.share, vote.n_votes, threshold=0.75, min_annotations=3, max_annotations=7
    )
    assert decision.status.tolist() == [TaskStatus.FINALISED, TaskStatus.COLLECTING]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: majority_vote([0, 1], [0]), "equal length"),
        (lambda: majority_vote([0, -1], [0, 1]), r"items\[1\] = -1"),
        (lambda: majority_vote([0, 1], [0, 4], n_classes=3), r"labels\[1\] = 4"),
        (lambda: majority_vote([0, 3], [0, 1], n_items=2), r"items\[1\] = 3"),
        (lambda: reputation_weighted_vote([0], [3], [0], [0.9]), "annotator 3"),
        (lambda: reputation_weighted_vote([0], [0], [0], [1.5]), r"reputation\[0\] = 1.5"),
        (lambda: dawid_skene([0], [0], [0], max_iter=0), "max_iter"),
        (lambda: dawid_skene([0], [0], [0], confusion_prior=-1.0), "confusion_prior"),
        (lambda: dawid_skene([0], [0], [0], gold_items=[0]), "together"),
        (lambda: dawid_skene([0], [0], [0], gold_items=[0], gold_labels=[5]), "gold_labels"),
        (lambda: weighted_median([0, 0], [1.0, math.nan]), r"values\[1\]"),
        (lambda: weighted_median([0, 0], [1.0, 2.0], weights=[1.0]), "weights"),
        (lambda: bradley_terry([0, 1], [1, 1], [0, 0]), "player 1 with itself"),
        (lambda: bradley_terry([0], [1], [4]), r"outcome\[0\] = 4"),
        (lambda: bradley_terry([0], [1], [0], prior=0.0), "prior"),
        (lambda: bradley_terry([0], [1], [0], both_bad="loss"), "both_bad"),  # type: ignore[arg-type]
        (lambda: plackett_luce([[0, -1, 1]]), "gap"),
        (lambda: plackett_luce([[0, 1, 0]]), "twice"),
        (lambda: plackett_luce([0, 1]), "2-D"),
        (
            lambda: finalisation_decision(
                [0.5], [1], threshold=1.2, min_annotations=1, max_annotations=2
            ),
            "threshold",
        ),
        (
            lambda: finalisation_decision(
                [0.5], [1], threshold=0.8, min_annotations=3, max_annotations=2
            ),
            "min_annotations",
        ),
        (
            lambda: finalisation_decision(
                [1.5], [1], threshold=0.8, min_annotations=1, max_annotations=2
            ),
            "agreement",
        ),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(call: object, message: str) -> None:
    with pytest.raises(QualityInputError, match=message):
        call()  # type: ignore[operator]
