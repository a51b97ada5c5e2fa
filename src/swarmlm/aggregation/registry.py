"""Aggregators by name, configured from a config file: ``get_aggregator(name, **params)``.

The swarm layer builds one :class:`Aggregator` per run from its config and calls it once per
round with the stack of peer updates. The object validates its inputs (shape, dtype,
finiteness, Byzantine tolerance for the actual ``n``) and, for centered clipping, remembers
the previous aggregate as the next round's centre.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from swarmlm.aggregation import robust
from swarmlm.aggregation.errors import AggregationError, ByzantineToleranceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorSpec:
    """A named rule, its tolerance bound and whether it uses reputation weights."""

    name: str
    fn: Callable[..., Tensor]
    max_f: Callable[[int], int]
    requirement: str
    accepts_weights: bool
    summary: str


AGGREGATORS: dict[str, AggregatorSpec] = {
    spec.name: spec
    for spec in (
        AggregatorSpec("mean", robust.mean, robust.max_f_none, "f = 0", True, "(weighted) mean"),
        AggregatorSpec(
            "median",
            robust.coordinate_median,
            robust.max_f_majority,
            "n >= 2f + 1",
            False,
            "coordinate-wise median",
        ),
        AggregatorSpec(
            "trimmed_mean",
            robust.trimmed_mean,
            robust.max_f_majority,
            "n >= 2f + 1",
            False,
            "coordinate-wise trimmed mean (beta per side, at least f)",
        ),
        AggregatorSpec("krum", robust.krum, robust.max_f_krum, "n >= 2f + 3", False, "Krum"),
        AggregatorSpec(
            "multi_krum",
            robust.multi_krum,
            robust.max_f_krum,
            "n >= 2f + 3",
            True,
            "mean of the m best Krum scores",
        ),
        AggregatorSpec(
            "bulyan", robust.bulyan, robust.max_f_bulyan, "n >= 4f + 3", False, "Bulyan over Krum"
        ),
        AggregatorSpec(
            "geometric_median",
            robust.geometric_median,
            robust.max_f_majority,
            "n >= 2f + 1",
            True,
            "smoothed Weiszfeld (RFA)",
        ),
        AggregatorSpec(
            "centered_clip",
            robust.centered_clip,
            robust.max_f_majority,
            "n >= 2f + 1",
            True,
            "centered clipping around the previous aggregate",
        ),
    )
}


#: Options every rule accepts, handled by :class:`Aggregator` rather than the rule itself.
COMMON_PARAMS = ("bucketing", "bucket_seed", "mixing")

#: Values of the ``mixing`` option.
MIXING = ("none", "nnm")


class Aggregator:
    """A configured aggregation rule: ``agg(stack, weights=None) -> (d,)``.

    ``params`` are the keyword arguments of the underlying function in
    :mod:`swarmlm.aggregation.robust` (``f``, ``beta``, ``tau``, ...); unknown names are
    rejected at construction. For ``centered_clip`` without an explicit ``center`` the
    previous output is the next centre (call :meth:`reset` when the model is reloaded).

    ``bucketing=s`` (default 1: off) runs the rule on the means of ``ceil(n / s)`` random
    buckets of ``s`` inputs (:func:`~swarmlm.aggregation.robust.bucket_means`), shuffled
    under ``bucket_seed`` plus the number of calls so far; ``f`` then counts poisoned buckets,
    so the rule must tolerate ``f`` out of ``ceil(n / s)`` (centered clipping:
    ``n >= s (2f + 1)``, roughly) and :meth:`check` refuses what it cannot.

    ``mixing="nnm"`` replaces each input by the mean of its ``n - f`` nearest inputs before the
    rule (:func:`~swarmlm.aggregation.robust.nearest_neighbor_mixing`): it narrows the honest
    spread the rule's tolerance is proportional to, without costing tolerance as bucketing
    does. The two are exclusive.
    """

    def __init__(self, name: str, **params: Any) -> None:
        spec = AGGREGATORS.get(name)
        if spec is None:
            raise AggregationError(
                f"unknown aggregator {name!r}; available: {', '.join(sorted(AGGREGATORS))}"
            )
        allowed = {
            p
            for p, v in inspect.signature(spec.fn).parameters.items()
            if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in ("weights", "center")
        }
        allowed |= set(COMMON_PARAMS)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise AggregationError(
                f"aggregator {name!r} has no parameter(s) {', '.join(unknown)}; "
                f"it accepts: {', '.join(sorted(allowed))}"
            )
        f = params.get("f", 0)
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise AggregationError(f"aggregator {name!r}: f must be a non-negative int, got {f!r}")
        bucketing = params.pop("bucketing", 1)
        if not isinstance(bucketing, int) or isinstance(bucketing, bool) or bucketing < 1:
            raise AggregationError(
                f"aggregator {name!r}: bucketing must be a positive int, got {bucketing!r}"
            )
        bucket_seed = params.pop("bucket_seed", 0)
        if not isinstance(bucket_seed, int) or isinstance(bucket_seed, bool):
            raise AggregationError(
                f"aggregator {name!r}: bucket_seed must be an int, got {bucket_seed!r}"
            )
        mixing = params.pop("mixing", "none")
        if mixing not in MIXING:
            raise AggregationError(
                f"aggregator {name!r}: mixing must be one of {', '.join(MIXING)}, got {mixing!r}"
            )
        if mixing != "none" and bucketing > 1:
            raise AggregationError(
                f"aggregator {name!r}: mixing={mixing!r} and bucketing={bucketing} are "
                "exclusive (both pre-process the inputs); choose one"
            )
        self.spec = spec
        self.name = name
        self.mixing: str = mixing
        self.params = dict(params)
        self.f: int = f
        self.bucketing: int = bucketing
        self.bucket_seed: int = bucket_seed
        self._center: Tensor | None = None
        self._calls = 0

    def max_f(self, n: int) -> int:
        """Largest ``f`` this rule tolerates among ``n`` inputs (counted in buckets when
        bucketing)."""
        return self.spec.max_f(robust.bucket_count(n, self.bucketing))

    def min_inputs(self) -> int:
        """Smallest n for which this rule tolerates the configured ``f``."""
        n = 1
        while self.spec.max_f(robust.bucket_count(n, self.bucketing)) < self.f:
            n += 1
        return n

    def check(self, n: int) -> None:
        """Raise :class:`ByzantineToleranceError` if ``n`` inputs cannot tolerate ``f``."""
        if self.f > self.spec.max_f(robust.bucket_count(n, self.bucketing)):
            requirement = self.spec.requirement
            if self.bucketing > 1:
                requirement = (
                    f"{requirement} counted in buckets of {self.bucketing} "
                    f"({robust.bucket_count(n, self.bucketing)} buckets here, each of the f "
                    f"Byzantine inputs can poison one); need n >= {self.min_inputs()}"
                )
            raise ByzantineToleranceError(self.name, n, self.f, requirement)

    def reset(self) -> None:
        """Forget the previous aggregate (centered clipping restarts from zero) and restart the
        bucket shuffles from ``bucket_seed``."""
        self._center = None
        self._calls = 0

    def __call__(
        self, stack: Tensor, weights: Tensor | None = None, *, center: Tensor | None = None
    ) -> Tensor:
        """Aggregate ``stack``. ``center`` (centered clipping only) replaces the remembered
        previous output as the clipping centre: for callers that keep the centre themselves,
        as the swarm does in its consensus state."""
        robust.check_stack(stack)
        self.check(stack.shape[0])
        if center is not None and self.name != "centered_clip":
            raise AggregationError(f"aggregator {self.name!r} takes no center")
        kwargs = dict(self.params)
        if weights is not None and not self.spec.accepts_weights:
            raise AggregationError(f"aggregator {self.name!r} does not take weights")
        if self.bucketing > 1:
            stack, weights = robust.bucket_means(
                stack, self.bucketing, seed=self.bucket_seed + self._calls, weights=weights
            )
        elif self.mixing == "nnm":
            stack = robust.nearest_neighbor_mixing(stack, f=self.f)
        self._calls += 1
        if weights is not None:
            kwargs["weights"] = weights
        if self.name == "centered_clip":
            center = self._center if center is None else center
            if center is not None and center.shape != (stack.shape[1],):
                logger.warning(
                    "centered_clip: input dimension changed from %d to %d; restarting from zero",
                    center.shape[0],
                    stack.shape[1],
                )
                center = None
            out = self.spec.fn(stack, center=center, **kwargs)
            self._center = out.clone()
            return out
        return self.spec.fn(stack, **kwargs)

    def __repr__(self) -> str:
        shown = dict(self.params)
        if self.bucketing > 1:
            shown.update(bucketing=self.bucketing, bucket_seed=self.bucket_seed)
        if self.mixing != "none":
            shown.update(mixing=self.mixing)
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(shown.items()))
        return f"Aggregator({self.name!r}{', ' if args else ''}{args})"


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """Build the aggregator ``name`` (see :data:`AGGREGATORS`) with ``params``."""
    return Aggregator(name, **params)


def check_aggregator(name: str, **params: Any) -> None:
    """Build ``name`` with ``params`` and run it once on a tiny stack: building checks the
    parameter names, the call their values (a negative ``tau`` would otherwise be accepted
    at start and fail every round on every node). Raises what the aggregator raises."""
    get_aggregator(name, f=0, **params)(torch.zeros(3, 2))
