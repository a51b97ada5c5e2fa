"""Load balancing of shards / annotation tasks: round-robin, least-loaded, performance."""

from __future__ import annotations

import pytest

from swarmlm.data.balance import Balancer, assign_all
from swarmlm.data.errors import DataError


def test_round_robin_deals_in_turn_whatever_the_load() -> None:
    b = Balancer(["p2", "p1", "p3"], "round_robin")
    got = [b.assign(f"shard{i}", cost=10.0 if i == 0 else 1.0) for i in range(6)]
    assert got == ["p1", "p2", "p3", "p1", "p2", "p3"]


def test_least_loaded_sends_work_to_the_idlest_worker() -> None:
    b = Balancer(["a", "b"], "least_loaded")
    assert b.assign("big", cost=5.0) == "a"
    assert [b.assign(i) for i in range(4)] == ["b", "b", "b", "b"]
    assert b.assign("next") == "b"  # b at 4 < a at 5
    b.complete("big")
    assert b.assign("after") == "a"


def test_performance_based_gives_fast_workers_more() -> None:
    b = Balancer(["slow", "fast"], "performance")
    # measured rates: fast does 4 units/s, slow 1 unit/s (both get one probe item first)
    first, second = b.assign("p0"), b.assign("p1")
    assert {first, second} == {"slow", "fast"}
    for item, w in (("p0", first), ("p1", second)):
        b.complete(item, seconds=0.25 if w == "fast" else 1.0)
    assert b.rate("fast") == 4.0
    counts = {"slow": 0, "fast": 0}
    for i in range(50):
        counts[b.assign(i)] += 1
    assert counts["fast"] == pytest.approx(40, abs=2)  # 4:1 by expected finish time
    b.add_worker("new")  # unmeasured: assumed median speed, so it gets work at once
    assert b.assign("x") == "new"


def test_a_leaving_worker_hands_back_its_items_for_reassignment() -> None:
    b = Balancer(["a", "b"], "least_loaded")
    for i in range(4):
        b.assign(i)
    orphans = b.remove_worker("a")
    assert sorted(orphans) == [0, 2]
    for item in orphans:
        assert b.assign(item) == "b"
    assert b.load("b") == 4


def test_assign_all_spreads_evenly() -> None:
    out = assign_all(range(10), ["x", "y", "z"], "round_robin")
    assert sorted(len(v) for v in out.values()) == [3, 3, 4]


def test_bad_balancer_input_is_named() -> None:
    with pytest.raises(DataError, match="unknown balancing policy 'random'"):
        Balancer(["a"], "random")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no workers"):
        Balancer([], "least_loaded").assign("t")
    b = Balancer(["a"])
    b.assign("t")
    with pytest.raises(DataError, match="already assigned"):
        b.assign("t")
    with pytest.raises(DataError, match="is not assigned"):
        b.complete("u")
    with pytest.raises(DataError, match="cost"):
        b.assign("v", cost=0)
