"""DP-SGD and noised round contributions for one peer (issue 25).

:class:`PrivateTraining` is what the trainer holds when ``privacy`` is on. It owns

* the **records**: this peer's training windows on a fixed grid (``seq_len + 1`` tokens,
  disjoint, every ``world_size``-th one from ``rank``: the peer's shard), so "one record"
  means the same thing at every step, which the accountant's neighbouring datasets need;
* :class:`PoissonWindows`: each step includes every record independently with rate
  ``q = expected batch / records`` (the sampling Opacus's accountants assume; the trainer's
  shuffled fixed-size batches would not be covered by them);
* :func:`clipped_gradient_sum`: per-sample gradients (``torch.func``: ``vmap`` of ``grad``
  over a ``functional_call`` of the model), each clipped to ``max_grad_norm``, summed;
* :func:`privatize_update`: the clip-and-noise of a round contribution;
* the :class:`~swarmlm.privacy.accountant.PrivacyLedger` that checks and counts both.

Noise and sampling come from the OS's entropy unless ``secure_rng`` is false: with a
generator seeded from ``train.seed`` (which every peer's config shares) anyone could
regenerate the noise and subtract it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from swarmlm.data import IGNORE_INDEX, TokenShards
from swarmlm.privacy.accountant import (
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyPlan,
    plan_privacy,
)
from swarmlm.privacy.config import PrivacyConfig

log = logging.getLogger(__name__)

# vmap has no batching rule for CPU SDPA and falls back to a loop, correctly; the warning
# would repeat on every DP-SGD step
warnings.filterwarnings(
    "ignore", message="There is a performance drop because we have not yet implemented the batching"
)


def _seed(secure: bool, *parts: object) -> int:
    if secure:
        return secrets.randbits(63)
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PoissonWindows:
    """This peer's records and their Poisson sampling.

    Records are the windows ``[k (T + 1), (k + 1)(T + 1))`` of the split with
    ``k % world_size == rank``; :meth:`sample` returns the record indices of one step, each
    included with probability ``rate`` (so the batch size varies, mean ``rate * records``).
    """

    def __init__(
        self, shards: TokenShards, seq_len: int, rank: int, world_size: int, seed: int
    ) -> None:
        self.shards = shards
        self.seq_len = seq_len
        windows = shards.num_tokens // (seq_len + 1)
        self.ids = np.arange(rank, windows, world_size, dtype=np.int64)
        if self.ids.size == 0:
            raise PrivacyConfigError(
                f"{shards.data_dir} ({shards.split}): no window of data.seq_len + 1 = "
                f"{seq_len + 1} tokens for shard {rank} of {world_size}: DP-SGD has no records"
            )
        self.rng = np.random.default_rng(seed)

    @property
    def records(self) -> int:
        return int(self.ids.size)

    def sample(self, rate: float) -> np.ndarray[Any, np.dtype[np.int64]]:
        return self.ids[self.rng.random(self.ids.size) < rate]

    def read(self, ids: np.ndarray[Any, np.dtype[np.int64]]) -> tuple[Tensor, Tensor]:
        """``(x, y)`` LongTensors ``(len(ids), T)`` of these records (targets shifted by one;
        loss-masked positions hold ``IGNORE_INDEX``)."""
        T = self.seq_len
        buf = np.empty((ids.size, T + 1), dtype=np.int64)
        keep = np.ones((ids.size, T), dtype=np.bool_)
        for i, k in enumerate(ids.tolist()):
            buf[i] = self.shards.read(k * (T + 1), T + 1)
            if self.shards.has_loss_mask:
                row = self.shards.read_mask(k * (T + 1) + 1, T)
                assert row is not None
                keep[i] = row
        x = torch.from_numpy(buf[:, :-1].copy())
        y = torch.from_numpy(buf[:, 1:].copy())
        y[torch.from_numpy(~keep)] = IGNORE_INDEX
        return x, y


def clipped_gradient_sum(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    max_norm: float,
    chunk: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[dict[str, Tensor], Tensor]:
    """Sum over rows of each row's gradient clipped to L2 norm ``max_norm`` (over all
    trainable parameters together), and the rows' losses ``(B,)``.

    A row whose gradient is not finite (every target masked) contributes zero: its
    contribution stays within the bound either way.
    """
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, (p, buffers), (xi[None],), {"targets": yi[None]})
        loss: Tensor = out.loss
        return loss, loss.detach()

    per_row = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    losses = []
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        with autocast():
            grads, loss = per_row(params, xc, yc)
        sq = torch.zeros(xc.shape[0], dtype=torch.float32)
        for g in grads.values():
            sq += g.float().flatten(1).pow(2).sum(1)
        norms = sq.sqrt()
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        factor = torch.where(torch.isfinite(norms), factor, torch.zeros_like(factor))
        for k, g in grads.items():
            g = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
            total[k] += torch.einsum("b,b...->...", factor, g)
        losses.append(loss.float())
    return total, torch.cat(losses) if losses else torch.zeros(0)


def privatize_update(
    update: Tensor, clip: float, noise_multiplier: float, generator: torch.Generator
) -> tuple[Tensor, float]:
    """``update * min(1, clip / |update|) + N(0, (noise_multiplier * clip)^2)`` per
    coordinate; returns it and the norm before clipping (float32 ``(d,)``)."""
    norm = float(update.norm())
    scale = min(1.0, clip / (norm + 1e-12))
    noise = torch.randn(update.shape, generator=generator, dtype=torch.float32)
    return update.float() * scale + noise * (noise_multiplier * clip), norm


class PrivateTraining:
    """The trainer's privacy component: DP-SGD steps, noised contributions, the ledger."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        *,
        shards: TokenShards,
        seq_len: int,
        expected_batch: int,
        planned_steps: int,
        planned_rounds: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.expected_batch = expected_batch
        self.windows: PoissonWindows | None = None
        rate = None
        if cfg.dp_sgd:
            self.windows = PoissonWindows(
                shards, seq_len, rank, world_size, _seed(cfg.secure_rng, seed, rank, "sample")
            )
            rate = expected_batch / self.windows.records
        self.plan: PrivacyPlan = plan_privacy(
            cfg, steps=planned_steps, sample_rate=rate, rounds=planned_rounds
        )
        self.ledger = PrivacyLedger(cfg, self.plan)
        self.generator = torch.Generator().manual_seed(_seed(cfg.secure_rng, seed, rank, "noise"))
        self.last_loss = float("nan")
        self.last_batch = 0
        if cfg.dp_sgd:
            assert self.windows is not None
            log.info(
                "DP-SGD: %d records of %d tokens, sample rate %.4g, noise multiplier %.4g, "
                "clip %g; %d planned steps spend epsilon %.3g at delta %g (%s)",
                self.windows.records,
                seq_len + 1,
                self.plan.sample_rate,
                self.plan.noise_multiplier,
                cfg.max_grad_norm,
                planned_steps,
                self.plan.record_epsilon,
                cfg.target_delta,
                cfg.accountant,
            )
        if cfg.contribution_noise:
            log.info(
                "noised contributions: clip %g, noise multiplier %.4g; %d planned rounds "
                "spend peer-level epsilon %.3g at delta %g",
                cfg.contribution_clip,
                self.plan.contribution_noise_multiplier,
                planned_rounds,
                self.plan.peer_epsilon,
                cfg.target_delta,
            )

    def gradient_step(
        self,
        model: nn.Module,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> tuple[float, float]:
        """One DP-SGD gradient: sets every trainable parameter's ``.grad`` to (sum of
        clipped per-record gradients + noise) / expected batch; returns (mean loss of the
        sampled records, or the previous one when none was sampled; gradient norm).
        Checks the budget first and counts the step."""
        assert self.windows is not None
        assert self.plan.noise_multiplier is not None
        self.ledger.check(steps=1)
        ids = self.windows.sample(float(self.plan.sample_rate or 0.0))
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        clip = self.cfg.max_grad_norm
        if ids.size:
            x, y = self.windows.read(ids)
            device = next(iter(params.values())).device
            sums, losses = clipped_gradient_sum(
                model, x.to(device), y.to(device), clip, self.cfg.per_sample_chunk, autocast
            )
            finite = losses[torch.isfinite(losses)]
            if finite.numel():
                self.last_loss = float(finite.mean())
        else:
            sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        std = self.plan.noise_multiplier * clip
        sq = 0.0
        for k, p in params.items():
            noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float32)
            g = (sums[k].cpu() + noise * std) / self.expected_batch
            sq += float(g.pow(2).sum())
            p.grad = g.to(p.device, p.dtype)
        self.ledger.spend(steps=1)
        self.last_batch = int(ids.size)
        return self.last_loss, math.sqrt(sq)

    def privatize(self, update: Tensor) -> Tensor:
        """A round contribution, clipped and noised; checks the budget and counts the round."""
        sigma = self.plan.contribution_noise_multiplier
        assert sigma is not None
        self.ledger.check(rounds=1)
        noised, norm = privatize_update(update, self.cfg.contribution_clip, sigma, self.generator)
        self.ledger.spend(rounds=1)
        log.debug(
            "contribution norm %.4g clipped to %g and noised", norm, self.cfg.contribution_clip
        )
        return noised

    def check_round(self, inner_steps: int) -> None:
        """Before a swarm round: would its DP-SGD steps or its contribution exceed the
        budget? (raises or warns per ``on_budget_spent``)."""
        self.ledger.check(
            steps=inner_steps if self.cfg.dp_sgd else 0,
            rounds=1 if self.cfg.contribution_noise else 0,
        )

    def report(self) -> dict[str, Any]:
        return self.ledger.report()
