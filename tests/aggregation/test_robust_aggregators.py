"""Behaviour of the robust aggregators: correctness, robustness, tolerance errors, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.aggregation import (
    AGGREGATORS,
    AggregationError,
    ByzantineToleranceError,
    bulyan,
    centered_clip,
    coordinate_median,
    geometric_median,
    get_aggregator,
    krum,
    mean,
    multi_krum,
    trimmed_mean,
)
from swarmlm.aggregation.robust import (
    _batcher_comparators,
    bucket_means,
    nearest_neighbor_mixing,
    pairwise_sq_distances,
)


def honest_and_byzantine(n: int, f: int, d: int, seed: int = 0, scale: float = 1e4) -> torch.Tensor:
    """Rows 0..f-1 are far-away Byzantine vectors; the rest cluster around 1.0."""
    gen = torch.Generator().manual_seed(seed)
    stack = 1.0 + 0.1 * torch.randn(n, d, generator=gen)
    stack[:f] = scale * torch.randn(f, d, generator=gen)
    return stack


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_sorting_network_median_matches_numpy_median(n: int, d: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    stack = torch.randn(n, d, generator=gen)
    # Ties must not matter either.
    stack[: n // 3] = stack[n // 3 : 2 * (n // 3)].clone() if n >= 3 else stack[: n // 3]
    expected = torch.from_numpy(np.median(stack.numpy(), axis=0).astype(np.float32))
    torch.testing.assert_close(coordinate_median(stack, chunk_size=7), expected)


def test_batcher_network_sorts_every_zero_one_input_for_small_n() -> None:
    # 0-1 principle: a comparator network sorts all inputs iff it sorts all 0/1 inputs.
    for n in range(1, 11):
        comps = _batcher_comparators(n)
        for mask in range(2**n):
            wires = [(mask >> i) & 1 for i in range(n)]
            for a, b in comps:
                if wires[a] > wires[b]:
                    wires[a], wires[b] = wires[b], wires[a]
            assert wires == sorted(wires), (n, mask)


def test_trimmed_mean_matches_numpy_reference() -> None:
    stack = torch.randn(11, 300, generator=torch.Generator().manual_seed(1))
    s = np.sort(stack.numpy(), axis=0)
    expected = torch.from_numpy(s[3:8].mean(axis=0))
    torch.testing.assert_close(trimmed_mean(stack, f=3, chunk_size=64), expected)
    # beta = 0.2 of n = 11 trims floor(2.2) = 2 per side.
    torch.testing.assert_close(trimmed_mean(stack, beta=0.2), torch.from_numpy(s[2:9].mean(axis=0)))


def test_weighted_mean_normalises_reputation_weights() -> None:
    stack = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    out = mean(stack, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0]))
    with pytest.raises(AggregationError, match="non-negative"):
        mean(stack, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(AggregationError, match=r"shape \(2,\)"):
        mean(stack, weights=torch.tensor([1.0]))


@pytest.mark.parametrize(
    ("name", "n", "f"),
    [
        ("median", 10, 4),
        ("trimmed_mean", 10, 4),
        ("krum", 9, 3),
        ("multi_krum", 9, 3),
        ("bulyan", 11, 2),
        ("geometric_median", 9, 4),
        ("centered_clip", 9, 4),
    ],
)
def test_robust_aggregators_bound_far_outliers_below_their_breakdown(
    name: str, n: int, f: int
) -> None:
    stack = honest_and_byzantine(n, f, d=64)
    agg = get_aggregator(name, f=f)
    for _ in range(10):  # centered clipping moves from its previous output round by round
        out = agg(stack)
    honest_center = stack[f:].mean(dim=0)
    honest_radius = float((stack[f:] - honest_center).norm(dim=1).max())
    assert float((out - honest_center).norm()) <= 3.0 * honest_radius
    # The mean is dragged arbitrarily far by the same inputs.
    assert float((mean(stack) - honest_center).norm()) > 100.0 * honest_radius


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 15),
    d=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    scale=st.floats(1.0, 1e6),
)
def test_coordinatewise_rules_stay_inside_the_honest_range(
    n: int, d: int, seed: int, scale: float
) -> None:
    f = (n - 1) // 2
    stack = honest_and_byzantine(n, f, d, seed=seed, scale=scale)
    lo = stack[f:].min(dim=0).values
    hi = stack[f:].max(dim=0).values
    for out in (coordinate_median(stack, f=f), trimmed_mean(stack, f=f)):
        assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


def test_krum_selects_the_input_closest_to_its_neighbours() -> None:
    stack = torch.tensor([[0.0], [0.1], [0.2], [0.3], [50.0], [-40.0], [10.0]])
    # n = 7, f = 2: each score sums the 3 nearest squared distances; row 1 or 2 wins.
    out = krum(stack, f=2)
    assert float(out) in (pytest.approx(0.1), pytest.approx(0.2))
    torch.testing.assert_close(
        multi_krum(stack, f=2, m=4), torch.tensor([0.15]), rtol=1e-6, atol=1e-6
    )


def test_pairwise_distances_match_direct_computation_despite_large_offset() -> None:
    gen = torch.Generator().manual_seed(3)
    stack = 1000.0 + torch.randn(6, 5000, generator=gen) * 1e-2
    direct = torch.cdist(stack.double(), stack.double()).square()
    torch.testing.assert_close(
        pairwise_sq_distances(stack, chunk_size=777), direct, rtol=1e-3, atol=1e-6
    )


def test_bulyan_averages_values_closest_to_the_median() -> None:
    stack = honest_and_byzantine(11, 2, d=32, seed=4)
    out = bulyan(stack, f=2, chunk_size=5)
    lo = stack[2:].min(dim=0).values
    hi = stack[2:].max(dim=0).values
    assert bool(((out >= lo) & (out <= hi)).all())


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    gen = torch.Generator().manual_seed(5)
    stack = torch.randn(7, 3, generator=gen)
    z = geometric_median(stack, iterations=200, ftol=0.0)

    def objective(p: torch.Tensor) -> float:
        return float((stack - p).norm(dim=1).sum())

    best = objective(z)
    for _ in range(50):
        assert objective(z + 1e-2 * torch.randn(3, generator=gen)) >= best - 1e-5
    assert best < objective(stack.mean(dim=0))


def test_centered_clipping_with_large_tau_is_the_mean_and_with_small_tau_moves_at_most_tau() -> (
    None
):
    gen = torch.Generator().manual_seed(6)
    stack = torch.randn(8, 40, generator=gen)
    torch.testing.assert_close(centered_clip(stack, tau=1e9), stack.mean(dim=0))
    center = torch.zeros(40)
    out = centered_clip(stack, center=center, tau=0.5)
    assert float(out.norm()) <= 0.5 + 1e-5


def test_centered_clip_aggregator_recentres_on_its_previous_output() -> None:
    agg = get_aggregator("centered_clip", f=1, tau=1.0)
    stack = torch.full((5, 4), 10.0)
    first = agg(stack)  # from zero, each input clipped to norm 1
    assert float(first.norm()) == pytest.approx(1.0, rel=1e-5)
    second = agg(stack)  # from the previous output, one more unit towards the inputs
    assert float(second.norm()) == pytest.approx(2.0, rel=1e-5)
    agg.reset()
    torch.testing.assert_close(agg(stack), first)


@pytest.mark.parametrize(
    ("name", "n", "f"),
    [
        ("mean", 5, 1),
        ("median", 6, 3),
        ("trimmed_mean", 4, 2),
        ("krum", 8, 3),
        ("multi_krum", 4, 1),
        ("bulyan", 10, 2),
        ("geometric_median", 2, 1),
        ("centered_clip", 4, 2),
    ],
)
def test_aggregator_refuses_n_f_it_cannot_tolerate_naming_both(name: str, n: int, f: int) -> None:
    stack = torch.randn(n, 3)
    with pytest.raises(ByzantineToleranceError, match=rf"f={f}.*n={n}") as err:
        get_aggregator(name, f=f)(stack)
    assert err.value.n == n
    assert err.value.f == f
    # The underlying pure function refuses it too.
    with pytest.raises(ByzantineToleranceError):
        AGGREGATORS[name].fn(stack, f=f)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregators_are_bitwise_deterministic(name: str) -> None:
    stack = honest_and_byzantine(11, 2, d=3000, seed=8)
    f = 0 if name == "mean" else 2
    a = get_aggregator(name, f=f)(stack.clone())
    b = get_aggregator(name, f=f)(stack.clone())
    assert torch.equal(a, b)
    assert a.shape == (3000,)
    assert a.dtype == torch.float32


def test_aggregator_registry_names_bad_inputs() -> None:
    with pytest.raises(AggregationError, match=r"unknown aggregator 'avg'.*median"):
        get_aggregator("avg")
    with pytest.raises(AggregationError, match=r"no parameter.*tau.*accepts"):
        get_aggregator("median", tau=1.0)
    stack = torch.randn(5, 4)
    stack[3, 1] = float("nan")
    with pytest.raises(AggregationError, match="row 3 contains NaN"):
        get_aggregator("median", f=1)(stack)
    with pytest.raises(AggregationError, match="float32"):
        get_aggregator("median")(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(AggregationError, match="does not take weights"):
        get_aggregator("median")(torch.randn(5, 4), weights=torch.ones(5))
    assert get_aggregator("krum", f=2).min_inputs() == 7
    assert get_aggregator("bulyan", f=2).min_inputs() == 11


def test_bucket_means_shuffle_deterministically_and_average_buckets() -> None:
    stack = torch.arange(7.0).unsqueeze(1).repeat(1, 3)
    means, totals = bucket_means(stack, 2, seed=5)
    again, _ = bucket_means(stack, 2, seed=5)
    assert torch.equal(means, again)
    assert totals is None
    assert means.shape == (4, 3)
    # Every row lands in exactly one bucket: the bucket sizes 2, 2, 2, 1 weight the means.
    torch.testing.assert_close(means[:3, 0].sum() * 2 + means[3, 0], torch.tensor(21.0))
    torch.testing.assert_close(bucket_means(stack, 7, seed=0)[0][0], torch.full((3,), 3.0))
    assert torch.equal(bucket_means(stack, 1, seed=1)[0].sort(dim=0).values, stack)
    with pytest.raises(AggregationError, match="bucket size"):
        bucket_means(stack, 0, seed=0)


def test_bucket_means_carry_reputation_weights() -> None:
    stack = torch.tensor([[0.0], [4.0]])
    means, totals = bucket_means(stack, 2, seed=0, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(means, torch.tensor([[1.0]]))
    assert totals is not None
    torch.testing.assert_close(totals, torch.tensor([1.0], dtype=torch.float64))


def test_bucketing_counts_poisoned_buckets_against_the_rule_tolerance() -> None:
    agg = get_aggregator("centered_clip", f=3, bucketing=2)
    # 3 bad inputs can poison 3 of ceil(n / 2) buckets: centered clipping needs 7 buckets.
    assert agg.min_inputs() == 13
    with pytest.raises(ByzantineToleranceError, match=r"buckets of 2.*need n >= 13"):
        agg(torch.zeros(10, 4))
    assert get_aggregator("centered_clip", f=3).min_inputs() == 7
    with pytest.raises(AggregationError, match="bucketing must be a positive int"):
        get_aggregator("median", bucketing=0)
    with pytest.raises(AggregationError, match="bucket_seed"):
        get_aggregator("median", bucket_seed=1.5)


def test_bucketing_lets_krum_pick_a_bucket_mean_with_half_the_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    plain, bucketed = get_aggregator("krum", f=1), get_aggregator("krum", f=1, bucketing=2)
    err_plain = err_bucketed = 0.0
    for _ in range(5):
        stack = 1.0 + torch.randn(12, 2000, generator=gen)
        stack[0] = 50.0
        err_plain += float((plain(stack) - 1.0).square().mean())
        err_bucketed += float((bucketed(stack) - 1.0).square().mean())
    # One honest row has variance 1 per coordinate; a bucket of two, 1/2.
    assert 0.8 < err_plain / 5 < 1.2
    assert 0.4 < err_bucketed / 5 < 0.6


def test_nearest_neighbour_mixing_averages_each_row_with_its_n_minus_f_nearest() -> None:
    # Two tight honest clusters and one far Byzantine row: with f = 1 every honest row is
    # averaged with its 3 nearest (itself first), never with the far row.
    stack = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    mixed = nearest_neighbor_mixing(stack, f=1)
    torch.testing.assert_close(mixed[:, 0], torch.tensor([1.5, 1.5, 1.5, 1.5, 26.5]))
    # f = 0: every row becomes the mean; identical inputs give identical outputs (ties).
    torch.testing.assert_close(nearest_neighbor_mixing(stack, f=0), stack.mean(0).expand(5, 1))
    assert torch.equal(nearest_neighbor_mixing(stack, f=1), mixed)
    dup = torch.ones(4, 3)
    assert torch.equal(nearest_neighbor_mixing(dup, f=1), dup)
    with pytest.raises(AggregationError, match="0 <= f < n"):
        nearest_neighbor_mixing(stack, f=5)


def test_mixing_narrows_what_centered_clipping_lets_a_constant_attacker_move() -> None:
    # Noisy honest rows (spread >> mean) and f = 3 attackers at a large constant: centered
    # clipping's bias is proportional to the honest spread, which mixing divides.
    gen = torch.Generator().manual_seed(0)
    honest = 0.1 + torch.randn(7, 256, generator=gen)
    bad = torch.full((3, 256), 50.0)
    stack = torch.cat([bad, honest])
    plain = get_aggregator("centered_clip", f=3, iterations=3)(stack)
    mixed = get_aggregator("centered_clip", f=3, iterations=3, mixing="nnm")(stack)
    truth = honest.mean(0)
    assert (mixed - truth).norm() < 0.5 * (plain - truth).norm()
    with pytest.raises(AggregationError, match="exclusive"):
        get_aggregator("median", f=1, mixing="nnm", bucketing=2)
    with pytest.raises(AggregationError, match="mixing must be one of"):
        get_aggregator("median", f=1, mixing="knn")
    assert "mixing='nnm'" in repr(get_aggregator("median", f=1, mixing="nnm"))
