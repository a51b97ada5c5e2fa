"""The ``privacy`` section of a run config: differential privacy for one peer (issue 25).

Torch-free, so a config loads (and ``swarmlm config show`` prints it) without importing
torch or Opacus; the budget arithmetic lives in :mod:`swarmlm.privacy.accountant` and is
imported only when a mechanism is switched on.

Two mechanisms, usable together (docs/privacy.md says what each protects):

* ``dp_sgd``: per-record DP-SGD inside this peer's training (Poisson-sampled windows,
  per-sample gradient clipping to ``max_grad_norm``, Gaussian noise
  ``noise_multiplier * max_grad_norm``);
* ``contribution_noise``: each round's update is clipped to ``contribution_clip`` (L2) and
  Gaussian noise ``contribution_noise_multiplier * contribution_clip`` is added before it
  leaves the peer (swarm runs only; protects the peer's whole data per round).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from swarmlm.config import StrictModel


class PrivacyConfig(StrictModel):
    """Differential privacy of one peer's training and contributions (off by default)."""

    dp_sgd: bool = Field(
        default=False,
        description="train with DP-SGD: Poisson-sampled windows (expected batch = "
        "data.batch_size x train.grad_accum), per-sample clipping, Gaussian noise",
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0, description="DP-SGD: L2 bound of one record's gradient"
    )
    noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        description="DP-SGD: noise std / max_grad_norm; None = calibrated so the planned "
        "steps spend exactly target_epsilon",
    )
    per_sample_chunk: int = Field(
        default=16, ge=1, description="DP-SGD: records whose gradients are computed at once"
    )
    contribution_noise: bool = Field(
        default=False,
        description="swarm: clip each round's update to contribution_clip and add Gaussian "
        "noise before it is sent",
    )
    contribution_clip: float = Field(
        default=1.0, gt=0, description="L2 bound of one round's update (parameter units)"
    )
    contribution_noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        description="noise std / contribution_clip; None = calibrated so swarm.rounds "
        "rounds spend exactly target_epsilon",
    )
    target_epsilon: float | None = Field(
        default=None,
        gt=0,
        description="privacy budget; a run whose planned steps would exceed it is refused; "
        "None = account and report without a budget",
    )
    target_delta: float = Field(default=1e-5, gt=0, lt=1, description="the delta of (eps, delta)")
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="Opacus accountant: rdp (Renyi DP) or prv (tighter, slower)"
    )
    on_budget_spent: Literal["stop", "warn"] = Field(
        default="stop",
        description="when the next step or round would exceed target_epsilon: stop training "
        "(a swarm peer stops contributing) or warn once and go on",
    )
    secure_rng: bool = Field(
        default=True,
        description="draw the noise and the sampling from the OS's entropy; false = from "
        "train.seed (reproducible; tests and benchmarks only: anyone who knows the seed can "
        "subtract the noise)",
    )

    @property
    def enabled(self) -> bool:
        return self.dp_sgd or self.contribution_noise

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        for on, noise, field in (
            (self.dp_sgd, self.noise_multiplier, "noise_multiplier"),
            (
                self.contribution_noise,
                self.contribution_noise_multiplier,
                "contribution_noise_multiplier",
            ),
        ):
            if on and noise is None and self.target_epsilon is None:
                raise ValueError(
                    f"privacy.{field} is unset and privacy.target_epsilon too: set the noise, "
                    "or a target epsilon to calibrate it from"
                )
        if (
            self.dp_sgd
            and self.contribution_noise
            and (self.noise_multiplier is None or self.contribution_noise_multiplier is None)
        ):
            raise ValueError(
                "privacy.dp_sgd and privacy.contribution_noise together compose into one "
                "record-level budget: set both privacy.noise_multiplier and "
                "privacy.contribution_noise_multiplier (calibration splits no budget)"
            )
        return self
