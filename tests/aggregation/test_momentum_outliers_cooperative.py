"""Worker momentum, outlier scoring for reputation, and the cooperative alpha rule."""

from __future__ import annotations

import pytest
import torch

from swarmlm.aggregation import (
    AggregationError,
    WorkerMomentum,
    cooperative_aggregate,
    cooperative_combine,
    get_aggregator,
    outlier_scores,
)


def test_worker_momentum_is_a_per_worker_exponential_average() -> None:
    wm = WorkerMomentum(beta=0.5)
    torch.testing.assert_close(wm.update("a", torch.tensor([4.0])), torch.tensor([4.0]))
    torch.testing.assert_close(wm.update("b", torch.tensor([-2.0])), torch.tensor([-2.0]))
    torch.testing.assert_close(wm.update("a", torch.tensor([0.0])), torch.tensor([2.0]))
    torch.testing.assert_close(wm.update("a", torch.tensor([0.0])), torch.tensor([1.0]))
    wm.forget("a")
    torch.testing.assert_close(wm.update("a", torch.tensor([8.0])), torch.tensor([8.0]))
    assert len(wm) == 2


def test_worker_momentum_reduces_honest_noise_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    wm = WorkerMomentum(beta=0.9)
    for _ in range(200):
        out = wm.update_stack(1.0 + torch.randn(8, 2000, generator=gen))
    # EMA of unit-variance noise has variance (1 - beta) / (1 + beta) ~ 0.053.
    assert 0.03 < float(out.var()) < 0.08
    torch.testing.assert_close(out.mean(), torch.tensor(1.0), atol=0.05, rtol=0)


def test_worker_momentum_refuses_bad_beta_and_shape_changes() -> None:
    with pytest.raises(AggregationError, match="beta"):
        WorkerMomentum(beta=1.0)
    wm = WorkerMomentum(beta=0.9)
    wm.update(3, torch.zeros(4))
    with pytest.raises(AggregationError, match=r"worker 3.*shape"):
        wm.update(3, torch.zeros(5))


def test_outlier_scores_flag_the_byzantine_inputs_for_reputation() -> None:
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn(12, 500, generator=gen) * 0.1
    stack[[2, 7]] += 5.0
    report = outlier_scores(stack, get_aggregator("median", f=2)(stack), k=3.0)
    assert report.flagged_indices() == [2, 7]
    assert report.distances.shape == (12,)
    assert float(report.z_scores[2]) > 3.0 > float(report.z_scores[0])


def test_outlier_scores_flag_nobody_when_all_inputs_are_identical() -> None:
    stack = torch.ones(5, 10)
    report = outlier_scores(stack, stack[0].clone())
    assert report.flagged_indices() == []
    with pytest.raises(AggregationError, match="aggregate must be"):
        outlier_scores(stack, torch.ones(9))


def test_cooperative_rule_mixes_local_update_with_the_robust_aggregate() -> None:
    local = torch.tensor([1.0, 1.0])
    peers = torch.tensor([[3.0, 3.0], [3.0, 3.0], [100.0, -100.0]])
    out = cooperative_aggregate(local, peers, 0.25, get_aggregator("median", f=1))
    torch.testing.assert_close(out, torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(cooperative_combine(local, peers[0], 1.0), local)
    torch.testing.assert_close(cooperative_combine(local, peers[0], 0.0), peers[0])
    with pytest.raises(AggregationError, match="alpha"):
        cooperative_combine(local, peers[0], 1.5)
    with pytest.raises(AggregationError, match="shape"):
        cooperative_combine(local, torch.zeros(3), 0.5)
