"""Outlier scoring: how far each input sits from the aggregate, for reputation.

The spread is estimated robustly (median and scaled median absolute deviation) so that a
minority of Byzantine inputs cannot inflate the "standard deviation" and hide inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError
from swarmlm.aggregation.robust import DEFAULT_CHUNK, _row_distances, check_stack

#: Scales the median absolute deviation to the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class OutlierReport:
    """Per-input outlier evidence; every tensor has shape ``(n,)`` in input order.

    ``distances``: Euclidean distance of each input to the aggregate (float64).
    ``z_scores``: ``(distance - median) / robust_std``; ``robust_std = 1.4826 * MAD``,
    floored at ``1e-6 * median`` (and 1e-12) so identical honest inputs do not divide by 0.
    ``flagged``: ``z_scores > k``.
    """

    distances: Tensor
    z_scores: Tensor
    flagged: Tensor
    k: float

    def flagged_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.flagged).flatten()]


def outlier_scores(
    stack: Tensor, aggregate: Tensor, *, k: float = 3.0, chunk_size: int = DEFAULT_CHUNK
) -> OutlierReport:
    """Score each row of ``stack`` ``(n, d)`` by its distance to ``aggregate`` ``(d,)``.

    Rows farther than ``k`` robust standard deviations above the median distance are flagged.
    """
    check_stack(stack)
    _n, d = stack.shape
    if aggregate.shape != (d,) or aggregate.dtype != torch.float32:
        raise AggregationError(
            f"aggregate must be a float32 vector of shape ({d},), "
            f"got {aggregate.dtype} {tuple(aggregate.shape)}"
        )
    if not k > 0.0:
        raise AggregationError(f"outlier threshold k must be positive, got {k}")
    dist = _row_distances(stack, aggregate, chunk_size)
    med = dist.median()
    mad = (dist - med).abs().median()
    std = torch.clamp(MAD_TO_STD * mad, min=max(1e-6 * float(med), 1e-12))
    z = (dist - med) / std
    return OutlierReport(distances=dist, z_scores=z, flagged=z > k, k=k)
