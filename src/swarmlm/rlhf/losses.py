"""The mathematics of alignment as pure functions over tensors: no model, no disk, no I/O.

Conventions: ``mask`` tensors are 1.0 on real response tokens and 0.0 on padding; per-token
tensors are (batch, response_len); rewards and values are in the reward model's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- reward modelling -----------------------------------------------------------------------


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None = None,
    centring_coef: float = 0.0,
) -> Tensor:
    """Negative log-likelihood of the Bradley-Terry model ``P(c > r) = sigmoid(r_c - r_r)``.

    ``margin`` (n,) is subtracted from the reward difference (Llama 2: pairs judged clearly
    better must be separated by more). ``centring_coef`` adds ``coef * mean((r_c + r_r)^2)``,
    which pins the rewards' mean near zero (Eisenstein et al. 2023) since the Bradley-Terry
    likelihood is blind to a shared offset.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if centring_coef > 0:
        loss = loss + centring_coef * ((chosen + rejected) ** 2).mean()
    return loss


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Share of pairs whose chosen reward strictly exceeds the rejected one."""
    return float((chosen > rejected).float().mean())


# ---- DPO / IPO -------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on summed response log-probs.

    Inputs are (n,) sums of log-probabilities of each response under the policy and the frozen
    reference. With ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    * sigmoid (DPO): ``-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)`` (conservative DPO
      when ``label_smoothing = eps > 0``);
    * ipo: ``(h - 1 / (2 beta))^2``; IPO's paper averages log-probs over tokens, so pass
      length-normalised log-probs for it.

    Returns (mean loss, implicit chosen rewards, implicit rejected rewards), the rewards being
    ``beta * (pi - ref)`` detached.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


# ---- token statistics ------------------------------------------------------------------------


def logprobs_of(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) gathered at ``tokens``: (b, t, v), (b, t) -> (b, t).

    The temperature must be the one used for sampling, otherwise the ratio and KL compare
    different distributions (Huang et al. 2022, detail "temperature in logprobs").
    """
    scaled = logits.float() / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / T) per position: (b, t, v) -> (b, t), in nats."""
    scaled = logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Scale ``x`` to unit variance over the masked entries; with ``shift_mean`` also to zero
    mean. Padding positions come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- PPO -------------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    ``rewards``, ``values``, ``mask`` are (b, t). An episode ends at its last real token (the
    value after it is 0); padding positions get advantage 0. Returns (advantages, returns) with
    ``returns = advantages + values``:

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1}
    """
    values = values * mask
    rewards = rewards * mask
    t_len = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(t_len)):
        next_value = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: ``mean(max(-A r, -A clip(r, 1-e, 1+e)))`` with ``r = exp(lp - old)``.

    Returns (loss, clip fraction, approximate KL ``0.5 mean((lp - old)^2)``), the last two
    detached, all averaged over real tokens.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = (0.5 * masked_mean(log_ratio**2, mask)).detach()
    return loss, clip_frac, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: ``0.5 mean(max((V - R)^2, (clip(V, V_old +- e) - R)^2))``.

    Returns (loss, fraction of tokens where the clipped term was larger), the second detached.
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, clip_frac


def kl_penalised_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``-beta (log pi - log ref)`` plus the sequence score on the last real
    token. ``scores`` is (b,). Returns (rewards (b, t), per-token KL estimate (b, t)).

    The last real token is the last position where ``mask`` is 1, so the tensors may span
    prompt + response (the mask 0 on the prompt), as PPO's do. Reading it as "number of real
    tokens - 1" would hold only for response-only tensors: with a prompt in front the score
    landed inside the response (or, behind a long prompt, on the prompt, where it was lost).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    real = mask > 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(real, positions, 0).max(1).values
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_token = real.any(1)
    rewards[rows, last] += torch.where(has_token, scores, torch.zeros_like(scores))
    return rewards, kl


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): a proportional controller that steers the KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta (1 + e n_steps / horizon)``.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def preference_calibration_error(chosen: Tensor, rejected: Tensor, bins: int = 10) -> float:
    """Expected calibration error of the Bradley-Terry probabilities ``sigmoid(r_c - r_r)``
    on pairs whose true order is chosen > rejected: the predicted winner's probability
    (confidence, in [0.5, 1]) against how often that prediction is right, averaged over
    ``bins`` equal-width confidence bins weighted by their share of pairs. 0 is perfect."""
    p = torch.sigmoid((chosen - rejected).double())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    error = 0.0
    n = max(1, p.numel())
    for i in range(bins):
        upper = confidence <= edges[i + 1] if i == bins - 1 else confidence < edges[i + 1]
        inside = (confidence >= edges[i]) & upper
        if inside.any():
            gap = (confidence[inside].mean() - correct[inside].mean()).abs()
            error += float(gap) * int(inside.sum()) / n
    return error
