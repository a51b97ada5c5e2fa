"""Cross-round reputation in front of a robust rule: exclude workers that keep pulling against it.

A per-round robust rule cannot remove a bias it cannot see. Centered clipping, for instance,
leaves ``f / (n - f)`` of the honest spread along the attack direction at its fixed point, and
a sign-flipped vector that sits inside the honest spread is barely clipped at all: both cost a
few percent of final loss in the robustness benchmark, every round, forever. What gives such
workers away is their history: a sign flipper's vector points against the aggregate round
after round, and a large constant is an outlier in distance round after round.

:class:`ReputationFilter` keeps, per worker id, an exponential moving average of one score per
round (the reputation mechanism of Xu and Lyu 2021, "A Reputation Mechanism Is All You Need",
whose score is the cosine to the aggregate; FLTrust, Cao et al. 2021, likewise gives no weight
to a negative cosine):

* ``s_i = cos(x_i, aggregate)``, in ``[-1, 1]``;
* ``s_i = -1`` when ``x_i`` is farther from the aggregate than ``far_ratio`` times the median
  distance of the aggregated rows (the distance outlier rule of the swarm's reputation), since
  a clipped far vector can still line up with the aggregate its residue has dragged along.

Before aggregating, the workers whose reputation is below ``threshold`` (0: more against the
aggregate than with it, on average) are left out, the worst first, and at most ``f`` of them:
the rule then still sees every honest input unless an honest worker has itself pointed
against the aggregate for many rounds. With ``f = 0`` nothing is ever excluded, so a run
configured for no attackers is exactly the inner rule.

Limits: a worker that keeps a small positive cosine and a normal distance (A Little Is Enough,
mimic) is never excluded; the inner rule has to hold against it, as it does without the
filter. An attacker who behaves for many rounds earns a good reputation it can spend, but only
``(1 - decay)`` of a round's score moves it, so it is excluded again within a few rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from swarmlm.aggregation.errors import AggregationError
from swarmlm.aggregation.robust import DEFAULT_CHUNK, _chunks, check_stack


class ReputationFilter:
    """Exclude up to ``f`` workers of low reputation, aggregate the rest, update reputations.

    ``aggregator`` is any ``(stack) -> (d,)`` rule (an :class:`~swarmlm.aggregation.Aggregator`
    keeps its own state, such as centered clipping's centre, across calls). ``f`` is the
    number of Byzantine workers to tolerate and ``min_inputs`` the fewest rows on which the
    rule still tolerates ``f`` (``Aggregator.min_inputs()``): at most ``min(f, n - min_inputs)``
    rows are excluded, so the rule is never starved (centered clipping with f = 3 needs 7
    rows, so all 3 can be excluded from 10, none from 7). ``decay`` is the EMA factor of the
    reputation,
    ``far_ratio`` the distance rule, ``threshold`` the reputation below which a worker is
    excluded. A new worker starts at reputation 0 (not excluded).
    """

    def __init__(
        self,
        aggregator: Callable[[Tensor], Tensor],
        *,
        f: int,
        min_inputs: int = 1,
        decay: float = 0.9,
        far_ratio: float = 2.0,
        threshold: float = 0.0,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise AggregationError(f"reputation filter: f must be a non-negative int, got {f!r}")
        if not isinstance(min_inputs, int) or min_inputs < 1:
            raise AggregationError(
                f"reputation filter: min_inputs must be a positive int, got {min_inputs!r}"
            )
        if not 0.0 <= decay < 1.0:
            raise AggregationError(f"reputation filter: decay must be in [0, 1), got {decay}")
        if not (math.isfinite(far_ratio) and far_ratio > 1.0):
            raise AggregationError(
                f"reputation filter: far_ratio must be a finite number > 1, got {far_ratio}"
            )
        if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise AggregationError(
                f"reputation filter: threshold must be in [-1, 1] (a cosine), got {threshold}"
            )
        self.aggregator = aggregator
        self.f = f
        self.min_inputs = min_inputs
        self.decay = decay
        self.far_ratio = far_ratio
        self.threshold = threshold
        self.chunk_size = chunk_size
        self.reputation: dict[Hashable, float] = {}
        #: Positions (in the last call's input order) of the rows left out of the last round.
        self.last_excluded: list[int] = []
        #: Each row's score in the last round (cosine, or -1 for a distance outlier).
        self.last_scores: Tensor = torch.zeros(0, dtype=torch.float64)

    @classmethod
    def around(
        cls,
        aggregator: Callable[[Tensor], Tensor],
        *,
        decay: float = 0.9,
        far_ratio: float = 2.0,
        threshold: float = 0.0,
    ) -> ReputationFilter:
        """Wrap an :class:`~swarmlm.aggregation.Aggregator`, taking its ``f`` and minimum n."""
        f = getattr(aggregator, "f", None)
        min_inputs = getattr(aggregator, "min_inputs", None)
        if not isinstance(f, int) or not callable(min_inputs):
            raise AggregationError(
                "ReputationFilter.around needs an Aggregator (with f and min_inputs()); "
                "construct ReputationFilter(rule, f=..., min_inputs=...) for a plain function"
            )
        return cls(
            aggregator,
            f=f,
            min_inputs=int(min_inputs()),
            decay=decay,
            far_ratio=far_ratio,
            threshold=threshold,
        )

    def excluded(self, ids: Sequence[Hashable]) -> list[int]:
        """Positions in ``ids`` that the next aggregation leaves out (worst reputation first)."""
        budget = min(self.f, len(ids) - self.min_inputs)
        if budget <= 0:
            return []
        bad = [
            (self.reputation[w], i)
            for i, w in enumerate(ids)
            if w in self.reputation and self.reputation[w] < self.threshold
        ]
        bad.sort()
        return sorted(i for _, i in bad[:budget])

    def __call__(self, stack: Tensor, ids: Sequence[Hashable] | None = None) -> Tensor:
        """Aggregate ``stack`` ``(n, d)`` whose rows come from workers ``ids`` (default
        ``0..n-1``); returns the inner rule's ``(d,)`` output over the rows kept."""
        check_stack(stack)
        n = stack.shape[0]
        if ids is None:
            ids = list(range(n))
        if len(ids) != n:
            raise AggregationError(f"reputation filter: {len(ids)} worker ids for {n} rows")
        if len(set(ids)) != n:
            raise AggregationError("reputation filter: worker ids must be distinct")
        excluded = self.excluded(ids)
        left_out = set(excluded)
        kept = [i for i in range(n) if i not in left_out]
        out = self.aggregator(stack[kept] if excluded else stack)
        self.last_excluded = excluded
        self.last_scores = self._scores(stack, out, kept)
        for i, w in enumerate(ids):
            prev = self.reputation.get(w, 0.0)
            self.reputation[w] = self.decay * prev + (1.0 - self.decay) * float(self.last_scores[i])
        return out

    def _scores(self, stack: Tensor, out: Tensor, kept: list[int]) -> Tensor:
        n, d = stack.shape
        dots = torch.zeros(n, dtype=torch.float64)
        norms_sq = torch.zeros(n, dtype=torch.float64)
        for sl in _chunks(d, self.chunk_size):
            block = stack[:, sl].to(torch.float64)
            dots += block @ out[sl].to(torch.float64)
            norms_sq += block.square().sum(dim=1)
        out_norm = float(torch.linalg.vector_norm(out.to(torch.float64)))
        if out_norm == 0.0:
            # A zero aggregate says nothing about anyone's direction.
            return torch.zeros(n, dtype=torch.float64)
        cos = dots / (norms_sq.sqrt().clamp_min(1e-30) * out_norm)
        # |x - o|^2 = |x|^2 - 2 x.o + |o|^2, from the sums above (no second pass over stack)
        dist = (norms_sq - 2.0 * dots + out_norm**2).clamp_min(0.0).sqrt()
        far = dist > self.far_ratio * dist[kept].median()
        return torch.where(far, torch.full_like(cos, -1.0), cos.clamp(-1.0, 1.0))

    def forget(self, worker: Hashable) -> None:
        """Drop a departed worker's reputation (a rejoining worker starts from 0)."""
        self.reputation.pop(worker, None)
