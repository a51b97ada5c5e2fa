"""Worker momentum: aggregate per-worker momentum vectors instead of raw gradients.

Karimireddy, He and Jaggi (2021) show that robust aggregators only hold against
time-coupled attacks when each worker sends ``m_t = beta * m_{t-1} + (1 - beta) * g_t``:
momentum averages out the honest noise, so Byzantine vectors can no longer hide inside it.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError


class WorkerMomentum:
    """Exponential moving average of one worker's (or each worker's) gradients.

    The EMA form ``(1 - beta)`` keeps the momentum on the scale of a gradient, so the server
    learning rate does not depend on ``beta``. ``beta = 0`` passes gradients through.
    State is keyed by worker id, so one instance serves a whole simulated swarm and a swarm
    peer can keep one for itself.
    """

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise AggregationError(f"worker momentum beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._state: dict[Hashable, Tensor] = {}

    def update(self, worker: Hashable, grad: Tensor) -> Tensor:
        """Fold ``grad`` (float32, any shape) into ``worker``'s momentum; return a copy of it."""
        if grad.dtype != torch.float32:
            raise AggregationError(f"worker {worker!r}: gradient must be float32, got {grad.dtype}")
        prev = self._state.get(worker)
        if prev is None or self.beta == 0.0:
            # First step: m_1 = g_1 (no zero-initialisation bias).
            m = grad.detach().clone()
        else:
            if prev.shape != grad.shape:
                raise AggregationError(
                    f"worker {worker!r}: gradient shape {tuple(grad.shape)} differs from its "
                    f"momentum shape {tuple(prev.shape)}"
                )
            m = prev.mul_(self.beta).add_(grad.detach(), alpha=1.0 - self.beta)
        self._state[worker] = m
        return m.clone()

    def update_stack(self, grads: Tensor) -> Tensor:
        """Update workers ``0..n-1`` from the rows of ``grads`` ``(n, d)``; return ``(n, d)``."""
        if grads.dim() != 2:
            raise AggregationError(f"grads must have shape (n, d), got {tuple(grads.shape)}")
        return torch.stack([self.update(i, grads[i]) for i in range(grads.shape[0])])

    def forget(self, worker: Hashable) -> None:
        """Drop a departed worker's state (a rejoining worker starts afresh)."""
        self._state.pop(worker, None)

    def __len__(self) -> int:
        return len(self._state)
