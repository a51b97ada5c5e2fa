"""Rollouts other peers can check: sampling from a public random stream, the record a peer
sends with its update, and the recomputation that accepts or rejects it.

A rollout of peer ``p`` in round ``r`` is response ``j`` to the prompt the swarm assigned it
(:func:`assigned_prompts`: a seeded draw from the shared prompt file, by ``r``, ``p``, ``j``).
Its tokens are drawn by inverse transform sampling from the uniforms of a stream seeded by
``(seed, r, p, j)`` (:func:`stream_uniforms`): token ``t`` is the first index whose
cumulative probability under the agreed policy (at the sampling temperature) exceeds
``u_t``. So a verifier holding the agreed policy needs no second sampling run: one
teacher-forced forward over prompt + response gives every position's distribution, and the
claimed token must be the one ``u_t`` selects, up to a tolerance on the cumulative
probability that absorbs floating-point differences between an incremental and a
full-sequence forward (:func:`check_rollout`).

The record (:class:`RolloutRecord`) also claims each response token's log-probability
(checked within ``logprob_tolerance``) and the reward-model score of the response (checked
exactly: scored alone, batch 1, one thread, as the sender must). Which rollouts are checked
is drawn after submission from the decided round (:func:`sample_indices`), so a sender
cannot know in advance which of its rollouts will be recomputed; the chance that ``m``
forged rollouts out of ``n`` all escape a sample of ``k`` is :func:`miss_probability`.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from swarmlm.model import Transformer

MAX_RECORD_BYTES = 8 << 20  # a record larger than this (inflated) is refused unread
RECORD_VERSION = 1


class RolloutRejectedError(ValueError):
    """A rollout record fails a check; ``evidence`` says which rollout and what differed."""

    def __init__(self, reason: str, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.evidence = evidence or {}


def _seed_of(*parts: object) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & ((1 << 63) - 1)


def assigned_prompts(seed: int, round: int, peer: str, n_prompts: int, count: int) -> list[int]:
    """Indices of the prompts ``peer`` answers in ``round``: a seeded draw without
    replacement (with replacement past ``n_prompts``); every peer computes the same."""
    g = torch.Generator().manual_seed(_seed_of("prompts", seed, round, peer))
    if count <= n_prompts:
        return [int(i) for i in torch.randperm(n_prompts, generator=g)[:count]]
    return [int(i) for i in torch.randint(n_prompts, (count,), generator=g)]


def stream_uniforms(seed: int, round: int | str, peer: str, index: int, length: int) -> Tensor:
    """The uniforms (float64, ``(length,)``) rollout ``index`` of ``peer`` samples with."""
    g = torch.Generator().manual_seed(_seed_of("stream", seed, round, peer, index))
    return torch.rand(length, generator=g, dtype=torch.float64)


def _distribution(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def inverse_cdf(probs: Tensor, u: float) -> int:
    """The first index whose cumulative probability exceeds ``u`` (clamped to the last)."""
    cdf = torch.cumsum(probs, dim=-1)
    token = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)))
    return min(token, probs.numel() - 1)


class NonFiniteLogitsError(ValueError):
    """The policy produced NaN or infinite logits (it diverged)."""


@torch.no_grad()
def sample_from_stream(
    model: Transformer,
    prompt: Sequence[int],
    uniforms: Tensor,
    *,
    temperature: float,
    eos_id: int,
) -> tuple[list[int], bool]:
    """Sample up to ``len(uniforms)`` tokens after ``prompt`` by inverse transform sampling.
    Returns the response (ending with ``eos_id`` when the model produced it) and whether it
    finished. Raises :class:`NonFiniteLogitsError` on NaN/inf logits."""
    response: list[int] = []
    n = uniforms.numel()
    if n == 0:
        return response, False
    cache = model.new_cache(1, len(prompt) + n)  # prefill once, then one token per step
    logits = model(torch.tensor([list(prompt)]), cache=cache, num_logits_to_keep=1).logits[0, -1]
    for t in range(n):
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(f"non-finite logits at response token {t}")
        token = inverse_cdf(_distribution(logits, temperature), float(uniforms[t]))
        response.append(token)
        if token == eos_id:
            return response, True
        if t + 1 < n:
            step = torch.tensor([[token]])
            logits = model(step, cache=cache, num_logits_to_keep=1).logits[0, -1]
    return response, False


@dataclass
class Rollout:
    """One rollout as claimed: ``logprobs`` of each response token (temperature-scaled),
    ``reward`` the reward function's score of the response (before any missing-EOS penalty)."""

    prompt: list[int]
    response: list[int]
    finished: bool
    logprobs: list[float]
    reward: float


@dataclass
class RolloutRecord:
    """What a peer sends with its update: its rollouts of the round and a random nonce (so
    no other peer can predict the bytes of its contribution, whose digest seeds the sample
    of checked rollouts)."""

    rollouts: list[Rollout]
    nonce: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = {
            "v": RECORD_VERSION,
            "nonce": self.nonce,
            "meta": self.meta,
            "rollouts": [
                [r.prompt, r.response, r.finished, r.logprobs, r.reward] for r in self.rollouts
            ],
        }
        return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 6)

    @classmethod
    def decode(cls, data: bytes) -> RolloutRecord:
        """Strict parse; raises :class:`RolloutRejectedError` naming the defect."""
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, MAX_RECORD_BYTES)
            if inflater.unconsumed_tail:
                raise RolloutRejectedError(f"record inflates beyond {MAX_RECORD_BYTES} bytes")
            body = json.loads(raw)
        except (zlib.error, ValueError) as exc:
            if isinstance(exc, RolloutRejectedError):
                raise
            raise RolloutRejectedError(f"rollout record is not compressed JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("v") != RECORD_VERSION:
            raise RolloutRejectedError("rollout record has no version 1 header")
        rows = body.get("rollouts")
        if not isinstance(rows, list):
            raise RolloutRejectedError("rollout record field 'rollouts' must be a list")
        out = []
        for j, row in enumerate(rows):
            try:
                prompt, response, finished, logprobs, reward = row
                ok = (
                    _int_list(prompt)
                    and _int_list(response)
                    and isinstance(finished, bool)
                    and isinstance(logprobs, list)
                    and all(_number(x) for x in logprobs)
                    and _number(reward)
                )
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RolloutRejectedError(f"rollout {j}: malformed fields")
            values = [float(x) for x in logprobs] + [float(reward)]
            if not all(math.isfinite(v) for v in values):
                raise RolloutRejectedError(f"rollout {j}: non-finite log-prob or reward")
            out.append(
                Rollout(prompt, response, finished, [float(x) for x in logprobs], float(reward))
            )
        nonce = body.get("nonce")
        meta = body.get("meta")
        return cls(
            out, nonce if isinstance(nonce, str) else "", meta if isinstance(meta, dict) else {}
        )


def _int_list(x: object) -> bool:
    return isinstance(x, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in x
    )


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sample_indices(seed: bytes, peer: str, n: int, k: int) -> list[int]:
    """Which of ``peer``'s ``n`` rollouts are checked: ``k`` drawn from ``seed`` (derived from
    the decided round, the same on every honest peer) and the peer's id."""
    g = torch.Generator().manual_seed(_seed_of("check", seed.hex(), peer))
    return sorted(int(i) for i in torch.randperm(n, generator=g)[: min(k, n)])


def miss_probability(n: int, m: int, k: int) -> float:
    """Chance that none of ``m`` forged rollouts among ``n`` is in a uniform sample of ``k``:
    ``C(n - m, k) / C(n, k)`` (0 when a forged one must be drawn)."""
    if m <= 0:
        return 1.0
    if k >= n or n - m < k:
        return 0.0
    return math.comb(n - m, k) / math.comb(n, k)


def response_logprobs_of(
    model: Transformer, prompt: Sequence[int], response: Sequence[int], temperature: float
) -> tuple[Tensor, Tensor]:
    """Teacher-forced distributions (float64 ``(len(response), vocab)``) and log-probs
    (float32 ``(len(response),)``) of each response token after ``prompt``."""
    ids = torch.tensor([[*prompt, *response]])
    logits = model(ids[:, :-1]).logits[0, len(prompt) - 1 :]
    probs = _distribution(logits, temperature)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    tokens = torch.tensor(list(response))
    return probs, logp.gather(-1, tokens[:, None]).squeeze(-1)


@dataclass(frozen=True)
class CheckSettings:
    """How a rollout is recomputed: the sampling settings the sender had to use and the
    tolerances (``cdf_tolerance`` on cumulative probabilities, ``logprob_tolerance`` on each
    token's log-probability; rewards are compared exactly)."""

    temperature: float
    max_new_tokens: int
    eos_id: int
    logprob_tolerance: float = 1e-3
    cdf_tolerance: float = 1e-4


@torch.no_grad()
def check_rollout(
    model: Transformer,
    rollout: Rollout,
    uniforms: Tensor,
    settings: CheckSettings,
    reward_fn: Callable[[list[int], list[int]], float],
    index: int,
) -> None:
    """Recompute rollout ``index`` under the agreed policy ``model`` and reward function;
    raise :class:`RolloutRejectedError` with the evidence at the first difference."""
    resp = rollout.response
    if not rollout.prompt:
        raise RolloutRejectedError(f"rollout {index}: empty prompt", {"rollout": index})
    if not resp or len(resp) > settings.max_new_tokens:
        raise RolloutRejectedError(
            f"rollout {index}: response of {len(resp)} tokens (1..{settings.max_new_tokens})",
            {"rollout": index, "length": len(resp)},
        )
    ends = resp[-1] == settings.eos_id
    if settings.eos_id in resp[:-1] or rollout.finished != ends:
        raise RolloutRejectedError(
            f"rollout {index}: EOS inside the response or 'finished' contradicts it",
            {"rollout": index},
        )
    if not ends and len(resp) != settings.max_new_tokens:
        raise RolloutRejectedError(
            f"rollout {index}: stopped after {len(resp)} tokens without EOS",
            {"rollout": index},
        )
    if len(rollout.logprobs) != len(resp):
        raise RolloutRejectedError(
            f"rollout {index}: {len(rollout.logprobs)} log-probs for {len(resp)} tokens",
            {"rollout": index},
        )
    probs, logp = response_logprobs_of(model, rollout.prompt, resp, settings.temperature)
    if not torch.isfinite(probs).all():
        raise RolloutRejectedError(f"rollout {index}: the agreed policy's logits are not finite")
    cdf = torch.cumsum(probs, dim=-1)
    tol = settings.cdf_tolerance
    for t, token in enumerate(resp):
        if token >= cdf.shape[1]:
            raise RolloutRejectedError(f"rollout {index}: token {token} is outside the vocabulary")
        u = float(uniforms[t]) * float(cdf[t, -1])
        low = float(cdf[t, token - 1]) if token > 0 else 0.0
        high = float(cdf[t, token])
        if not (low - tol <= u <= high + tol):
            raise RolloutRejectedError(
                f"rollout {index}: token {t} ({token}) is not the one its random stream "
                f"selects (u={u:.6f}, token's interval [{low:.6f}, {high:.6f}])",
                {
                    "rollout": index,
                    "token": t,
                    "claimed": token,
                    "selected": inverse_cdf(probs[t], float(uniforms[t])),
                },
            )
    claimed = torch.tensor(rollout.logprobs, dtype=torch.float32)
    diff = (claimed - logp).abs()
    worst = int(diff.argmax())
    if float(diff[worst]) > settings.logprob_tolerance:
        raise RolloutRejectedError(
            f"rollout {index}: log-prob of token {worst} claimed {float(claimed[worst]):.6f}, "
            f"recomputed {float(logp[worst]):.6f} (tolerance {settings.logprob_tolerance})",
            {
                "rollout": index,
                "token": worst,
                "claimed": float(claimed[worst]),
                "recomputed": float(logp[worst]),
            },
        )
    reward = reward_fn(rollout.prompt, resp)
    if reward != rollout.reward:
        raise RolloutRejectedError(
            f"rollout {index}: reward claimed {rollout.reward!r}, recomputed {reward!r}",
            {"rollout": index, "claimed": rollout.reward, "recomputed": reward},
        )
