"""The cooperative rule of the original swarmlm design.

``final = alpha * local + (1 - alpha) * robust_aggregate(peers)``: a peer trusts its own
update with weight ``alpha`` and the robust aggregate of its peers' updates with the rest.
``alpha = 0`` is plain robust aggregation; ``alpha = 1`` ignores the swarm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError


def cooperative_combine(local: Tensor, peers_aggregate: Tensor, alpha: float) -> Tensor:
    """``alpha * local + (1 - alpha) * peers_aggregate`` for two float32 vectors ``(d,)``."""
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise AggregationError(f"cooperative alpha must be in [0, 1], got {alpha}")
    if local.shape != peers_aggregate.shape:
        raise AggregationError(
            f"local update shape {tuple(local.shape)} differs from the peers' aggregate shape "
            f"{tuple(peers_aggregate.shape)}"
        )
    return torch.lerp(peers_aggregate, local, alpha)


def cooperative_aggregate(
    local: Tensor,
    peers: Tensor,
    alpha: float,
    aggregator: Callable[[Tensor], Tensor],
) -> Tensor:
    """Apply ``aggregator`` to the peers' stack ``(n, d)`` and mix in ``local`` ``(d,)``."""
    if peers.dim() != 2 or peers.shape[1:] != local.shape:
        raise AggregationError(
            f"peers must have shape (n, {local.numel()}), got {tuple(peers.shape)}"
        )
    return cooperative_combine(local, aggregator(peers), alpha)
