"""Target global batch: how long a peer trains so that the swarm together processes
``target_samples`` per round, slow and fast peers alike (hivemind's ``target_batch_size``).

There is no progress gossip during a round, so each peer plans from the previous round's
decided contributions, which carry every contributor's samples and compute seconds. The
swarm's throughput is estimated as ``n x median(samples_i / seconds_i)``: the median keeps
``f < n / 2`` peers that lie about their speed from shrinking or stretching everyone's round.
Every peer then trains for ``target / throughput`` seconds; a fast peer fits more steps in
that time than a slow one, and the swarm's total lands near the target.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping


def round_time_budget(
    target_samples: int, throughput: Mapping[str, tuple[int, float]]
) -> float | None:
    """Seconds of local training per peer for the next round, or ``None`` without data.

    ``throughput`` maps each contributor of the last round to ``(samples, seconds)``.
    """
    rates = [s / t for s, t in throughput.values() if t > 0 and s > 0]
    if not rates or target_samples <= 0:
        return None
    swarm_rate = len(rates) * statistics.median(rates)
    budget = target_samples / swarm_rate
    return budget if math.isfinite(budget) else None
