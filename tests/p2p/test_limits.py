"""RateLimiter: token buckets per key, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmlm.p2p.limits import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_does() -> None:
    clock = FakeClock()
    rl: RateLimiter[str] = RateLimiter(rate=10.0, burst=5, clock=clock)
    assert all(rl.allow("a") for _ in range(5))
    assert not rl.allow("a")
    assert rl.refused["a"] == 1
    clock.now += 0.15  # one token back (and a half)
    assert rl.allow("a")
    assert not rl.allow("a")
    clock.now += 100.0  # refill is capped at burst
    assert rl.tokens("a") == pytest.approx(5.0)


def test_keys_are_independent_and_the_table_is_bounded() -> None:
    clock = FakeClock()
    rl: RateLimiter[str] = RateLimiter(rate=1.0, burst=1, max_keys=3, clock=clock)
    assert rl.allow("a")
    assert not rl.allow("a")
    assert rl.allow("b")  # a's flood costs b nothing
    for k in "cdefg":
        rl.allow(k)
    assert len(rl) == 3
    assert "a" not in rl
    assert "a" not in rl.refused


def test_forget_restores_a_full_bucket() -> None:
    rl: RateLimiter[str] = RateLimiter(rate=1.0, burst=2, clock=FakeClock())
    rl.allow("a")
    rl.allow("a")
    assert not rl.allow("a")
    rl.forget("a")
    assert rl.allow("a")


def test_bad_settings_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match="rate=0"):
        RateLimiter(rate=0, burst=1)


@given(
    rate=st.floats(0.5, 100),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_admitted_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = FakeClock()
    rl: RateLimiter[str] = RateLimiter(rate=rate, burst=burst, clock=clock)
    start = clock.now
    admitted = 0
    for gap in gaps:
        clock.now += gap
        admitted += rl.allow("p")
    assert admitted <= burst + rate * (clock.now - start) + 1e-6
