"""Byzantine attacks for tests and simulations.

Each attack is a function of what an attacker can see, packed in an :class:`AttackContext`:
its own honest computation (``own``: the vectors the ``f`` attackers would have sent had they
been honest, computed on their own data) and, for the omniscient attacks (ALIE, IPM, mimic),
the honest inputs of the round. It returns the ``(f, d)`` float32 stack the attackers send.

Label flipping acts on the data, not on vectors: :func:`label_flip_targets` rewrites the
targets an attacker trains on, and the ``label_flip`` attack then sends ``own`` unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError


@dataclass(frozen=True)
class AttackContext:
    """What the ``f`` attackers know in one round.

    ``honest``: ``(n - f, d)`` honest inputs; ``own``: ``(f, d)`` the attackers' own honest
    computation; ``n``: total number of inputs; ``generator``: randomness for noisy attacks.
    """

    honest: Tensor
    own: Tensor
    n: int
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        if self.honest.dim() != 2 or self.own.dim() != 2:
            raise AggregationError(
                f"attack context needs honest (h, d) and own (f, d) stacks, got "
                f"{tuple(self.honest.shape)} and {tuple(self.own.shape)}"
            )
        if self.honest.shape[1] != self.own.shape[1]:
            raise AggregationError(
                f"honest inputs have d={self.honest.shape[1]}, attackers' own d={self.own.shape[1]}"
            )
        if self.honest.shape[0] + self.own.shape[0] != self.n:
            raise AggregationError(
                f"honest ({self.honest.shape[0]}) + attackers ({self.own.shape[0]}) != n={self.n}"
            )

    @property
    def f(self) -> int:
        return int(self.own.shape[0])


def _repeat(v: Tensor, f: int) -> Tensor:
    return v.unsqueeze(0).expand(f, -1).clone()


def sign_flip(ctx: AttackContext, *, scale: float = 1.0) -> Tensor:
    """Send ``-scale * own``: the attackers' own gradients, reversed."""
    return -scale * ctx.own


def gaussian_noise(ctx: AttackContext, *, relative_std: float = 10.0) -> Tensor:
    """Send pure noise ``N(0, s^2)`` with ``s = relative_std * RMS(own)`` per coordinate."""
    rms = float(ctx.own.square().mean().sqrt()) if ctx.own.numel() else 1.0
    noise = torch.randn(ctx.own.shape, generator=ctx.generator, dtype=torch.float32)
    return noise * (relative_std * max(rms, 1e-12))


def large_constant(ctx: AttackContext, *, value: float = 100.0) -> Tensor:
    """Send a vector with every coordinate equal to ``value``."""
    return torch.full(ctx.own.shape, float(value), dtype=torch.float32)


def label_flip(ctx: AttackContext) -> Tensor:
    """Send ``own`` unchanged; the attack happened in the data (:func:`label_flip_targets`)."""
    return ctx.own.clone()


def label_flip_targets(targets: Tensor, vocab_size: int) -> Tensor:
    """Map every target token ``t`` to ``vocab_size - 1 - t``; ignored targets (-100) stay."""
    return torch.where(targets >= 0, vocab_size - 1 - targets, targets)


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019 ``z_max``: ``s = floor(n/2 + 1) - f``, ``z = Phi^-1((n - s) / n)``."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def alie(ctx: AttackContext, *, z: float | None = None) -> Tensor:
    """A Little Is Enough (Baruch et al. 2019): every attacker sends ``mu - z * sigma``.

    ``mu`` and ``sigma`` are the coordinate-wise mean and standard deviation of the honest
    inputs; ``z`` defaults to the paper's ``z_max`` for ``(n, f)``: small enough that the
    vector hides inside the honest spread, so median and Krum keep selecting it.
    """
    if ctx.honest.shape[0] < 2:
        raise AggregationError("alie needs at least 2 honest inputs to estimate their spread")
    zz = alie_z(ctx.n, ctx.f) if z is None else z
    mu = ctx.honest.mean(dim=0)
    sigma = ctx.honest.std(dim=0)
    return _repeat(mu - zz * sigma, ctx.f)


def ipm(ctx: AttackContext, *, epsilon: float = 0.1) -> Tensor:
    """Inner Product Manipulation (Xie et al. 2019): send ``-epsilon * mean(honest)``.

    A small ``epsilon`` keeps the vectors close to the honest ones (defeating distance-based
    rules) while making the inner product of the aggregate with the true gradient negative
    once enough of them are averaged in.
    """
    return _repeat(-epsilon * ctx.honest.mean(dim=0), ctx.f)


def mimic(ctx: AttackContext, *, target: int = 0) -> Tensor:
    """Mimic (Karimireddy et al. 2022): all attackers copy honest input ``target``.

    Harmless to a single round's value but over-weights one worker's data, which biases
    training on heterogeneous shards.
    """
    if not 0 <= target < ctx.honest.shape[0]:
        raise AggregationError(
            f"mimic target {target} out of range for {ctx.honest.shape[0]} honest inputs"
        )
    return _repeat(ctx.honest[target], ctx.f)


Attack = Callable[[AttackContext], Tensor]

ATTACKS: dict[str, Callable[..., Tensor]] = {
    "sign_flip": sign_flip,
    "gaussian": gaussian_noise,
    "large_constant": large_constant,
    "label_flip": label_flip,
    "alie": alie,
    "ipm": ipm,
    "mimic": mimic,
}

#: Attacks whose effect is in the attackers' training data rather than in the vectors.
DATA_ATTACKS = frozenset({"label_flip"})


def get_attack(name: str, **params: Any) -> Attack:
    """The attack ``name`` (see :data:`ATTACKS`) with its keyword ``params`` bound."""
    fn = ATTACKS.get(name)
    if fn is None:
        raise AggregationError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}")
    allowed = [p for p in inspect.signature(fn).parameters if p != "ctx"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise AggregationError(
            f"attack {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(allowed) or 'none'}"
        )

    def attack(ctx: AttackContext) -> Tensor:
        out = fn(ctx, **params)
        return out.to(torch.float32)

    attack.__name__ = name
    return attack
