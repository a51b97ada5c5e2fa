"""Which data shards each member reads: the load-balancing policies of :mod:`swarmlm.data.balance`
applied to the round's decided facts.

Why not each peer's own hash (``swarm.shard_policy: hash``, the default): with 64 shards and
a handful of peers, hashing ids gives two peers the same shard more often than not (4 peers:
9 %; 10 peers: 52 %), so they train on the same text and the swarm sees less of the corpus.
The balanced policies hand the shards out over the round's membership instead:

Every member first gets one shard of its own (members in id order, while shards last), so
no two members read the same shard when ``data_shards >= n``; the remaining shards go by:

* ``round_robin``: members in id order, in turn (each ends with ``data_shards // n`` or one
  more);
* ``least_loaded``: the member holding the fewest (ties by id: the same counts);
* ``performance``: the member expected to finish soonest given the samples per second its
  contribution covered in the last decided round (the balancer's rule), so fast peers own
  more of the corpus and a slow peer, which reads less per round, owns less of it.

A member reads one shard per round, cycling through the shards it owns (round ``r`` reads
``owned[r % len(owned)]``). Everything comes from decided facts (the membership and the
samples/seconds the round's contributions carried), so every peer computes the same plan and
a Byzantine peer can only misreport its own speed, which moves only its own share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from swarmlm.data.balance import Balancer

ShardPolicy = Literal["hash", "round_robin", "least_loaded", "performance"]


def plan_shards(
    members: Sequence[str],
    data_shards: int,
    policy: ShardPolicy,
    throughput: Mapping[str, tuple[int, float]] | None = None,
) -> dict[str, list[int]]:
    """``{member: the shards it owns}`` for a balanced ``policy`` (``hash`` has no plan: each
    peer keeps its own). ``throughput``: the last decided round's ``(samples, seconds)`` per
    contributor, for ``performance``."""
    if policy == "hash":
        raise ValueError("the hash policy has no plan: each peer hashes its own id")
    if data_shards < 1:
        raise ValueError(f"data_shards must be >= 1, got {data_shards}")
    names = sorted(set(members))
    if not names:
        return {}
    balancer = Balancer(names, policy)
    if policy == "performance":
        for peer in names:  # each member's measured rate, from the decided round
            samples, seconds = (throughput or {}).get(peer, (0, 0.0))
            if samples > 0 and seconds > 0:
                balancer.set_rate(peer, samples / seconds)
    # every member first reads a shard of its own (while there are shards), so no member
    # falls back to a hashed shard someone else holds; the rest go by the policy
    plan: dict[str, list[int]] = {name: [] for name in names}
    for shard, name in zip(range(data_shards), names, strict=False):
        plan[name].append(shard)
    for shard in range(len(names), data_shards):
        plan[balancer.assign(shard)].append(shard)
    return plan


def shard_for_round(owned: Sequence[int], round: int, fallback: int) -> int:
    """The shard a member reads in ``round``: its owned shards in turn; ``fallback`` (its
    hashed shard) when it owns none (more members than shards)."""
    return owned[round % len(owned)] if owned else fallback
