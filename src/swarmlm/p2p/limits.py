"""Token-bucket rate limits, per key, with a bounded key table and an injected clock.

Used by the transport to bound request-like messages per peer (issue 17 #5) and reusable by
the round protocol for its per-peer buffers. Pure: no I/O, time comes from ``clock`` (any
monotonic seconds source), so tests drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` tokens per second.

    A request costing ``cost`` tokens passes if that many are available (and takes them);
    otherwise it is refused and takes nothing, so a peer that stops flooding recovers at
    ``rate`` tokens/s.
    """

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class RateLimiter(Generic[K]):
    """One :class:`TokenBucket` per key (e.g. a peer id), at most ``max_keys`` buckets.

    ``allow(key)`` is True when the key's bucket had a token. Buckets start full, so a
    burst of ``burst`` requests always passes; beyond that ``rate`` per second does.
    When the table is full the least recently used bucket is forgotten: that key starts
    again with a full bucket, which is the safe direction (it can only admit more, never
    refuse an honest key) and bounds memory to ``max_keys`` small objects.
    ``refused`` counts refusals per key since the key's bucket was created.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(
                f"RateLimiter needs rate > 0, burst >= 1, max_keys >= 1 "
                f"(got rate={rate}, burst={burst}, max_keys={max_keys})"
            )
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()
        self.refused: dict[K, int] = {}

    def allow(self, key: K, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False (nothing taken) if too few."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                old, _ = self._buckets.popitem(last=False)
                self.refused.pop(old, None)
        else:
            self._buckets.move_to_end(key)
        if bucket.take(now, cost):
            return True
        self.refused[key] = self.refused.get(key, 0) + 1
        return False

    def tokens(self, key: K) -> float:
        """Tokens ``key`` could spend now (``burst`` for a key never seen)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket.tokens + max(0.0, self.clock() - bucket.at) * self.rate)

    def forget(self, key: K) -> None:
        """Drop ``key``'s bucket (e.g. when its peer disconnects)."""
        self._buckets.pop(key, None)
        self.refused.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets
