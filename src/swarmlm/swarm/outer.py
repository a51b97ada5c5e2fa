"""Optimizers that apply the agreed aggregate to the flat consensus parameters.

Both are hand-written over flat float32 CPU vectors so that every peer computes the same
bits: only elementwise operations, no reductions whose order could depend on threads.

* :class:`NesterovOuter`: SGD with Nesterov momentum on pseudo-gradients (DiLoCo's outer
  optimizer, Douillard et al. 2023): ``b <- mu b + g`` (``b = g`` on the first step),
  ``theta <- theta - lr (g + mu b)``; ``mu = 0`` is plain SGD.
* :class:`FlatAdamW`: AdamW on aggregated gradients (synchronous mode), with decoupled
  weight decay on matrix entries only, as :func:`swarmlm.train.optim.build_adamw`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from swarmlm.swarm.errors import StateSyncError


class NesterovOuter:
    """Outer SGD with Nesterov momentum. State: the momentum buffer (``None`` before step 1)."""

    def __init__(self, lr: float, momentum: float, nesterov: bool = True) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.buf: Tensor | None = None

    def step(self, params: Tensor, grad: Tensor) -> None:
        """Update ``params`` (float32 ``(d,)``) in place with pseudo-gradient ``grad``."""
        if self.momentum == 0.0:
            params.sub_(grad, alpha=self.lr)
            return
        if self.buf is None:
            self.buf = grad.clone()
        else:
            self.buf.mul_(self.momentum).add_(grad)
        direction = grad.add(self.buf, alpha=self.momentum) if self.nesterov else self.buf
        params.sub_(direction, alpha=self.lr)

    def tensors(self, d: int) -> dict[str, Tensor]:
        return {"outer.momentum": self.buf if self.buf is not None else torch.zeros(0)}

    def scalars(self) -> dict[str, int | float]:
        return {}

    def load(self, tensors: dict[str, Tensor], scalars: dict[str, int | float], d: int) -> None:
        buf = tensors.get("outer.momentum")
        if buf is None:
            raise StateSyncError("swarm state lacks field 'outer.momentum'")
        if buf.numel() not in (0, d):
            raise StateSyncError(f"field 'outer.momentum' has {buf.numel()} values, expected {d}")
        self.buf = buf.clone() if buf.numel() else None


class FlatAdamW:
    """AdamW over one flat vector; ``mask`` is 1 where weight decay applies."""

    def __init__(
        self, betas: tuple[float, float], eps: float, weight_decay: float, mask: Tensor
    ) -> None:
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.mask = mask
        self.t = 0
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def step(self, params: Tensor, grad: Tensor, lr: float) -> None:
        b1, b2 = self.betas
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(params)
            self.v = torch.zeros_like(params)
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self.weight_decay:
            params.mul_(1.0 - lr * self.weight_decay * self.mask)
        bc1 = 1 - b1**self.t
        bc2 = 1 - b2**self.t
        denom = (self.v / bc2).sqrt_().add_(self.eps)
        params.addcdiv_(self.m, denom, value=-lr / bc1)

    def tensors(self, d: int) -> dict[str, Tensor]:
        empty = torch.zeros(0)
        return {
            "adamw.exp_avg": self.m if self.m is not None else empty,
            "adamw.exp_avg_sq": self.v if self.v is not None else empty,
        }

    def scalars(self) -> dict[str, int | float]:
        return {"adamw.step": self.t}

    def load(self, tensors: dict[str, Tensor], scalars: dict[str, int | float], d: int) -> None:
        for key in ("adamw.exp_avg", "adamw.exp_avg_sq"):
            t = tensors.get(key)
            if t is None:
                raise StateSyncError(f"swarm state lacks field {key!r}")
            if t.numel() not in (0, d):
                raise StateSyncError(f"field {key!r} has {t.numel()} values, expected {d}")
        m, v = tensors["adamw.exp_avg"], tensors["adamw.exp_avg_sq"]
        self.m = m.clone() if m.numel() else None
        self.v = v.clone() if v.numel() else None
        step = scalars.get("adamw.step", 0)
        if not isinstance(step, int) or step < 0:
            raise StateSyncError(f"field 'adamw.step' must be a non-negative int, got {step!r}")
        self.t = step
