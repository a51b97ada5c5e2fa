"""The alignment maths against hand-computed values (no models, no files)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swarmlm.rlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    dpo_loss,
    gae,
    kl_penalised_rewards,
    pairwise_accuracy,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)


def test_bradley_terry_loss_matches_the_formula_with_margin_and_centring() -> None:
    c, r = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    margin = torch.tensor([0.5, 0.0])
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    expected += 0.1 * ((3.0**2) + (2.0**2)) / 2
    got = bradley_terry_loss(c, r, margin, centring_coef=0.1)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(c, r) == 0.5


def test_bradley_terry_learns_a_separable_toy_set_to_full_accuracy() -> None:
    torch.manual_seed(0)
    direction = torch.randn(8)
    a, b = torch.randn(256, 8), torch.randn(256, 8)
    better_a = (a @ direction) > (b @ direction)
    chosen = torch.where(better_a[:, None], a, b)
    rejected = torch.where(better_a[:, None], b, a)
    w = torch.zeros(8, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    initial = float(bradley_terry_loss(chosen @ w, rejected @ w).detach())
    for _ in range(200):
        loss = bradley_terry_loss(chosen @ w, rejected @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert initial == pytest.approx(math.log(2), rel=1e-6)
    assert float(loss.detach()) < 0.1
    held_a, held_b = torch.randn(200, 8), torch.randn(200, 8)
    truth = (held_a @ direction) > (held_b @ direction)
    held_c = torch.where(truth[:, None], held_a, held_b)
    held_r = torch.where(truth[:, None], held_b, held_a)
    assert pairwise_accuracy(held_c @ w.detach(), held_r @ w.detach()) >= 0.95


def test_gae_matches_a_hand_computed_example() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # last position is padding
    gamma, lam = 0.9, 0.8
    # delta_2 = 2 + 0 - 1.5 = 0.5 (episode ends); A_2 = 0.5
    # delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35; A_1 = 0.35 + 0.72 * 0.5 = 0.71
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4;  A_0 = 1.4 + 0.72 * 0.71 = 1.9112
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv.tolist()[0] == pytest.approx([1.9112, 0.71, 0.5, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([2.4112, 1.71, 2.0, 0.0], abs=1e-6)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 0.3]])
    values = torch.tensor([[0.4, 0.5, 0.6]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.2 - 0.4, 0.1 - 0.5, 0.3 - 0.6], abs=1e-6)


def test_clipped_policy_loss_matches_hand_values() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approxkl = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5;
    # max(2.2, 2.2) = 2.2  -> mean 0.1667; clipped term larger only for token 0.
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert float(clipfrac) == pytest.approx(1 / 3)
    expected_kl = 0.5 * float((new**2).mean())
    assert float(approxkl) == pytest.approx(expected_kl, rel=1e-6)


def test_clipped_value_loss_matches_hand_values() -> None:
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    loss, frac = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped value 0.7 -> 0.49; max 1
    # token 1: both (0 - 1)^2 = 1; loss = 0.5 * mean(1, 1) = 0.5
    assert float(loss) == pytest.approx(0.5)
    assert float(frac) == 0.0
    loss2, _frac2 = ppo_value_loss(
        torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2
    )
    # unclipped (0-2)^2 = 4, clipped 0.8 -> 1.44: the clipped term is not larger
    assert float(loss2) == pytest.approx(2.0)
    loss3, frac3 = ppo_value_loss(
        torch.tensor([[3.0]]), torch.tensor([[1.0]]), torch.tensor([[2.5]]), torch.ones(1, 1), 0.2
    )
    # unclipped 0.25, clipped value 1.2 -> 1.69: clipped wins
    assert float(loss3) == pytest.approx(0.5 * 1.69)
    assert float(frac3) == 1.0


def test_adaptive_kl_controller_follows_its_formula() -> None:
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl2 = AdaptiveKLController(value=0.2, target=6.0, horizon=1000)
    ctl2.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl2.value == pytest.approx(0.2 * (1 - 0.1 * 100 / 1000))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


def test_kl_penalty_goes_on_every_token_and_the_score_on_the_last() -> None:
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([1.0, 2.0]), lp, ref, mask, 0.1)
    assert kl.tolist() == [[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]]
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 1.05])
    assert rewards[1].tolist() == pytest.approx([0.0, 1.9, 0.0])


def test_the_score_lands_on_the_last_response_token_after_a_prompt() -> None:
    # PPO's per-token tensors span prompt + response, the mask being 0 on the prompt: the
    # score belongs to the last response token, not to position (number of response tokens
    # - 1), which falls inside the response (or the prompt) when the prompt is long.
    mask = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    zeros = torch.zeros_like(mask)
    rewards, _ = kl_penalised_rewards(torch.tensor([1.0, 2.0]), zeros, zeros, mask, 0.1)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]


def test_a_row_without_response_tokens_gets_no_score() -> None:
    mask = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    zeros = torch.zeros_like(mask)
    rewards, _ = kl_penalised_rewards(torch.tensor([5.0, 3.0]), zeros, zeros, mask, 0.1)
    assert rewards.tolist() == [[0.0, 0.0], [3.0, 0.0]]


def test_whitening_gives_zero_mean_unit_variance_on_real_tokens() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].std().item() == pytest.approx(1.0, abs=1e-4)
    assert w[0, 3].item() == 0.0


def test_dpo_and_ipo_losses_on_known_logprobs() -> None:
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    # h = (pc - rc) - (pr - rr) = (1 - (-1), 0 - 1) = (2, -1)
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    expected = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-0.5))) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert cr.tolist() == pytest.approx([0.5, 0.0])
    assert rj.tolist() == pytest.approx([-0.5, 0.5])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert float(ipo) == pytest.approx(((2 - 1) ** 2 + (-1 - 1) ** 2) / 2)
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    h = torch.tensor([2.0, -1.0]) * 0.5
    expected_s = (-(0.9 * F.logsigmoid(h) + 0.1 * F.logsigmoid(-h))).mean()
    assert float(smooth) == pytest.approx(float(expected_s), rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")  # type: ignore[arg-type]
