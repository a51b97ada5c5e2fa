"""Agreement metrics against published worked examples and statsmodels (BSD) as reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.curation.agreement import (
    QualityInputError,
    category_counts,
    cohens_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    krippendorff_alpha_matrix,
)

NAN = math.nan
# Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
# 12 units, values 1-5, with missing ratings. Published: nominal .743, ordinal .815,
# interval .849, ratio .797.
KRIPPENDORFF_EXAMPLE = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
]


@pytest.mark.parametrize(
    ("level", "published"),
    [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)],
)
def test_krippendorff_alpha_reproduces_krippendorffs_worked_example_with_missing_data(
    level: str, published: float
) -> None:
    alpha = krippendorff_alpha_matrix(KRIPPENDORFF_EXAMPLE, level=level)  # type: ignore[arg-type]
    assert alpha == pytest.approx(published, abs=5e-4)


def test_krippendorff_alpha_from_rating_triples_equals_matrix_form() -> None:
    data = np.array(KRIPPENDORFF_EXAMPLE)
    raters, units = np.nonzero(~np.isnan(data))
    shuffle = np.random.default_rng(1).permutation(units.size)
    values = data[raters, units]
    for level in ("nominal", "ordinal", "interval", "ratio"):
        assert krippendorff_alpha(units[shuffle], values[shuffle], level=level) == pytest.approx(
            krippendorff_alpha_matrix(data, level=level), rel=1e-12
        )


def test_krippendorff_alpha_ignores_units_with_a_single_rating() -> None:
    data = np.array(KRIPPENDORFF_EXAMPLE)
    lonely = np.full((4, 1), NAN)
    lonely[2, 0] = 5.0  # a unit only one observer rated cannot be paired
    assert krippendorff_alpha_matrix(np.hstack([data, lonely])) == pytest.approx(
        krippendorff_alpha_matrix(data), rel=1e-12
    )


def test_krippendorff_alpha_is_one_for_perfect_agreement_and_nan_without_variation() -> None:
    assert krippendorff_alpha([0, 0, 1, 1, 2, 2], [3, 3, 1, 1, 2, 2]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha([0, 0, 1, 1], [2, 2, 2, 2]))
    assert math.isnan(krippendorff_alpha([0, 1, 2], [1, 2, 3]))  # nothing pairable


def test_interval_alpha_is_invariant_to_rescaling_the_rating_scale() -> None:
    rng = np.random.default_rng(2)
    units = np.repeat(np.arange(40), 3)
    values = rng.integers(1, 6, units.size).astype(float)
    base = krippendorff_alpha(units, values, level="interval")
    assert krippendorff_alpha(units, 10.0 * values - 7.0, level="interval") == pytest.approx(
        base, rel=1e-10
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=12, max_size=40),
    st.lists(st.integers(1, 50), min_size=5, max_size=5, unique=True),
)
def test_ordinal_alpha_depends_only_on_the_order_of_values(
    codes: list[int], scale: list[int]
) -> None:
    units = np.arange(len(codes)) // 3
    ranks = np.asarray(codes, dtype=float)
    relabelled = np.asarray(sorted(scale), dtype=float)[np.asarray(codes)]
    a = krippendorff_alpha(units, ranks, level="ordinal")
    b = krippendorff_alpha(units, relabelled, level="ordinal")
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_fleiss_kappa_reproduces_the_textbook_example() -> None:
    # Fleiss' kappa example (10 subjects, 14 raters, 5 categories), kappa = 0.210.
    table = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_fleiss_kappa_matches_statsmodels_on_simulated_annotations(seed: int) -> None:
    statsmodels_inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(seed)
    n_items, n_raters, n_classes = 60, 5, 4
    truth = rng.integers(0, n_classes, n_items)
    items = np.repeat(np.arange(n_items), n_raters)
    noisy = rng.random(items.size) < 0.35
    labels = np.where(noisy, rng.integers(0, n_classes, items.size), truth[items])
    counts = category_counts(items, labels, n_classes=n_classes)
    assert fleiss_kappa(counts) == pytest.approx(
        statsmodels_inter_rater.fleiss_kappa(counts), rel=1e-10
    )


def test_fleiss_kappa_with_varying_rater_counts_ignores_items_rated_once() -> None:
    counts = np.array([[3, 0, 0], [1, 2, 0], [0, 1, 1], [0, 0, 2]])
    extra = np.vstack([counts, [[0, 1, 0]], [[1, 0, 0]]])
    assert fleiss_kappa(extra) == pytest.approx(fleiss_kappa(counts), rel=1e-12)
    # hand computation: P_i = 1, 1/3, 0, 1 -> P_bar = 7/12; p = (4, 3, 3) / 10
    p_e = (16 + 9 + 9) / 100
    assert fleiss_kappa(counts) == pytest.approx((7 / 12 - p_e) / (1 - p_e), rel=1e-12)


def test_cohens_kappa_reproduces_the_textbook_example() -> None:
    # 50 proposals: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> kappa 0.4
    a = [0] * 20 + [0] * 5 + [1] * 10 + [1] * 15
    b = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("weights", ["none", "linear", "quadratic"])
def test_cohens_kappa_matches_statsmodels_including_weighted_kappa(weights: str) -> None:
    statsmodels_inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, 200)
    b = np.where(rng.random(200) < 0.6, a, np.clip(a + rng.integers(-1, 2, 200), 0, 3))
    table = np.zeros((4, 4))
    np.add.at(table, (a, b), 1)
    wt = None if weights == "none" else weights
    expected = statsmodels_inter_rater.cohens_kappa(table, wt=wt).kappa
    got = cohens_kappa(a, b, n_classes=4, weights=weights)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, rel=1e-10)


def test_cohens_kappa_drops_items_either_rater_skipped() -> None:
    a = np.array([0, 1, 2, 2, -1, 1, 0, 2])
    b = np.array([0, 1, 2, 1, 2, -1, 0, 2])
    both = (a >= 0) & (b >= 0)
    assert cohens_kappa(a, b) == pytest.approx(cohens_kappa(a[both], b[both]), rel=1e-12)
    assert math.isnan(cohens_kappa([-1, 0], [1, -1]))
    assert math.isnan(cohens_kappa([1, 1, 1], [1, 1, 1]))  # chance agreement is total


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cohens_kappa([0, 1], [0]), "equal length"),
        (lambda: cohens_kappa([0, -2], [0, 1]), r"labels_a\[1\] = -2"),
        (lambda: cohens_kappa([0, 1.5], [0, 1]), r"labels_a\[1\] = 1.5"),
        (lambda: cohens_kappa([0, 3], [0, 1], n_classes=3), r"labels_a\[1\] = 3 is out of range"),
        (lambda: cohens_kappa([0, 1], [0, 1], weights="cubic"), "weights"),  # type: ignore[arg-type]
        (lambda: fleiss_kappa([[1, 2], [0.5, 2]]), "counts"),
        (lambda: fleiss_kappa([1, 2, 3]), "2-D"),
        (lambda: krippendorff_alpha([0, 0], [1.0, math.inf]), r"values\[1\]"),
        (lambda: krippendorff_alpha([0, 0], [1, 2], level="fuzzy"), "level"),  # type: ignore[arg-type]
        (lambda: krippendorff_alpha([0, 0], [-1, 2], level="ratio"), "non-negative"),
        (lambda: krippendorff_alpha_matrix([1, 2]), "raters x units"),
        (lambda: category_counts([0, 1], [0, 1], weights=[1.0, -1.0]), r"weights\[1\]"),
        (lambda: category_counts([0, 5], [0, 1], n_items=3), r"items\[1\] = 5"),
        (lambda: category_counts([[0, 1]], [0, 1]), "one-dimensional"),
        (lambda: category_counts([True, False], [0, 1]), "booleans"),
    ],
)
def test_bad_input_raises_an_error_naming_the_argument(call: object, message: str) -> None:
    with pytest.raises(QualityInputError, match=message):
        call()  # type: ignore[operator]
