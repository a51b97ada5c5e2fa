"""The cross-round reputation filter in front of a robust rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.aggregation import AggregationError, ReputationFilter, get_aggregator


def _round(gen: torch.Generator, n: int = 10, d: int = 400, noise: float = 2.0) -> torch.Tensor:
    """Honest vectors: a shared signal plus noise twice its size, as in the benchmark."""
    signal = torch.ones(d) / d**0.5
    return signal + noise * torch.randn(n, d, generator=gen) / d**0.5


def test_sign_flippers_are_excluded_and_honest_workers_never_are() -> None:
    gen = torch.Generator().manual_seed(0)
    rep = ReputationFilter.around(get_aggregator("centered_clip", f=3, iterations=3))
    honest_excluded = 0
    for step in range(30):
        stack = _round(gen)
        stack[:3] = -stack[:3]
        rep(stack)
        honest_excluded += sum(1 for i in rep.last_excluded if i >= 3)
        if step >= 2:
            assert rep.last_excluded == [0, 1, 2]
    assert honest_excluded == 0
    assert all(rep.reputation[w] < 0 for w in range(3))
    assert all(rep.reputation[w] > 0 for w in range(3, 10))


def test_a_large_constant_is_excluded_by_distance_even_when_the_aggregate_leans_its_way() -> None:
    gen = torch.Generator().manual_seed(1)
    rep = ReputationFilter.around(get_aggregator("centered_clip", f=3))
    for _ in range(5):
        stack = _round(gen)
        stack[:3] = 100.0
        out = rep(stack)
    assert rep.last_excluded == [0, 1, 2]
    assert float(rep.last_scores[0]) == -1.0
    # With the attackers left out, the aggregate is back among the honest vectors.
    assert float(out.abs().max()) < 1.0


def test_with_f_zero_the_filter_is_exactly_the_inner_rule() -> None:
    gen = torch.Generator().manual_seed(2)
    plain = get_aggregator("centered_clip", f=0)
    rep = ReputationFilter.around(get_aggregator("centered_clip", f=0))
    for _ in range(5):
        stack = _round(gen)
        stack[:3] = -stack[:3]
        assert torch.equal(rep(stack), plain(stack))
        assert rep.last_excluded == []


def test_a_worker_that_turns_honest_is_let_back_in() -> None:
    gen = torch.Generator().manual_seed(3)
    rep = ReputationFilter.around(get_aggregator("centered_clip", f=2), decay=0.5)
    for _ in range(5):
        stack = _round(gen, n=8)
        stack[0] = -stack[0]
        rep(stack)
    assert rep.last_excluded == [0]
    for _ in range(10):
        rep(_round(gen, n=8))
    assert rep.last_excluded == []


def test_reputation_follows_worker_ids_not_row_positions() -> None:
    gen = torch.Generator().manual_seed(4)
    rep = ReputationFilter.around(get_aggregator("centered_clip", f=1))
    for _ in range(5):
        stack = _round(gen, n=5)
        stack[0] = -stack[0]
        rep(stack, ids=["bad", "a", "b", "c", "d"])
    # The same peers arrive in another order: the bad one is still left out.
    assert rep.excluded(["a", "b", "bad", "c", "d"]) == [2]
    rep.forget("bad")
    assert rep.excluded(["a", "b", "bad", "c", "d"]) == []


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 12),
    f=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    flipped=st.integers(0, 12),
)
def test_never_excludes_more_than_f_nor_leaves_the_rule_too_few_inputs(
    n: int, f: int, seed: int, flipped: int
) -> None:
    agg = get_aggregator("centered_clip", f=min(f, (n - 1) // 2))
    rep = ReputationFilter.around(agg)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        stack = _round(gen, n=n, d=50)
        stack[: min(flipped, n)] *= -1.0
        out = rep(stack)
        assert out.shape == (50,)
        assert len(rep.last_excluded) <= min(agg.f, n - agg.min_inputs())


def test_bad_parameters_and_inputs_are_refused_with_their_names() -> None:
    agg = get_aggregator("centered_clip", f=1)
    with pytest.raises(AggregationError, match="decay"):
        ReputationFilter.around(agg, decay=1.0)
    with pytest.raises(AggregationError, match="far_ratio"):
        ReputationFilter.around(agg, far_ratio=1.0)
    with pytest.raises(AggregationError, match="threshold"):
        ReputationFilter.around(agg, threshold=2.0)
    with pytest.raises(AggregationError, match="f must be"):
        ReputationFilter(agg, f=-1)
    with pytest.raises(AggregationError, match="needs an Aggregator"):
        ReputationFilter.around(lambda s: s.mean(dim=0))
    rep = ReputationFilter.around(agg)
    with pytest.raises(AggregationError, match="3 worker ids for 4 rows"):
        rep(torch.zeros(4, 2), ids=[0, 1, 2])
    with pytest.raises(AggregationError, match="distinct"):
        rep(torch.zeros(4, 2), ids=[0, 1, 1, 2])
    with pytest.raises(AggregationError, match="NaN"):
        rep(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]))


def test_a_zero_aggregate_moves_no_reputation() -> None:
    rep = ReputationFilter.around(get_aggregator("mean"))
    rep(torch.zeros(3, 4))
    assert rep.reputation == {0: 0.0, 1: 0.0, 2: 0.0}
