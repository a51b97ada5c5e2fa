"""Attacks behave as published, and the published break pattern appears on a toy problem."""

from __future__ import annotations

import pytest
import torch

from swarmlm.aggregation import (
    ATTACKS,
    AggregationError,
    AttackContext,
    WorkerMomentum,
    get_aggregator,
    get_attack,
    label_flip_targets,
)
from swarmlm.aggregation.attacks import alie_z


def _ctx(n: int = 10, f: int = 3, d: int = 50, seed: int = 0) -> AttackContext:
    gen = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.5 * torch.randn(n - f, d, generator=gen)
    own = 1.0 + 0.5 * torch.randn(f, d, generator=gen)
    return AttackContext(honest=honest, own=own, n=n, generator=gen)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_returns_one_float32_vector_per_attacker(name: str) -> None:
    out = get_attack(name)(_ctx())
    assert out.shape == (3, 50)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_attacks_do_what_their_papers_describe() -> None:
    ctx = _ctx()
    torch.testing.assert_close(get_attack("sign_flip")(ctx), -ctx.own)
    mu, sigma = ctx.honest.mean(0), ctx.honest.std(0)
    alie = get_attack("alie")(ctx)
    torch.testing.assert_close(alie[0], mu - alie_z(10, 3) * sigma)
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-3)  # Phi^-1(0.7)
    ipm = get_attack("ipm", epsilon=0.5)(ctx)
    assert float(ipm[0] @ mu) < 0
    torch.testing.assert_close(get_attack("mimic", target=2)(ctx)[1], ctx.honest[2])
    torch.testing.assert_close(
        get_attack("large_constant", value=7.0)(ctx), torch.full((3, 50), 7.0)
    )
    targets = torch.tensor([[0, 5, -100, 255]])
    assert label_flip_targets(targets, 256).tolist() == [[255, 250, -100, 0]]


def test_attack_registry_names_bad_inputs() -> None:
    with pytest.raises(AggregationError, match="unknown attack 'zero'"):
        get_attack("zero")
    with pytest.raises(AggregationError, match=r"no parameter.*scale"):
        get_attack("ipm", scale=2.0)
    with pytest.raises(AggregationError, match=r"honest.*attackers.*n=11"):
        AttackContext(honest=torch.zeros(7, 2), own=torch.zeros(3, 2), n=11)
    with pytest.raises(AggregationError, match="mimic target 9"):
        get_attack("mimic", target=9)(_ctx())


def _toy_descent(aggregator: str, attack: str, beta: float, steps: int = 60) -> float:
    """Minimise |w - 1|^2 / 2 with noisy worker gradients; 3 of 10 workers attack."""
    gen = torch.Generator().manual_seed(0)
    n, f, d = 10, 3, 20
    w = torch.zeros(d)
    wm = WorkerMomentum(beta)
    agg = get_aggregator(aggregator, **({} if aggregator == "mean" else {"f": f}))
    atk = get_attack(attack)
    for _ in range(steps):
        grads = (w - 1.0) + 2.0 * torch.randn(n, d, generator=gen)
        moms = wm.update_stack(grads)
        byz = atk(AttackContext(honest=moms[f:], own=moms[:f], n=n, generator=gen))
        w = w - 0.2 * agg(torch.cat([byz, moms[f:]]))
    return float((w - 1.0).norm())


def test_centered_clipping_with_momentum_holds_where_the_mean_breaks() -> None:
    clean = _toy_descent("mean", "label_flip", beta=0.9)  # label_flip sends honest vectors
    assert _toy_descent("mean", "large_constant", beta=0.9) > 100 * clean
    for attack in ("large_constant", "sign_flip", "gaussian", "ipm"):
        assert _toy_descent("centered_clip", attack, beta=0.9) < 3 * clean + 0.5, attack
