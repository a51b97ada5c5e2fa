"""Byte-bounded caches (LRU, LFU, FIFO, each with an optional TTL) and a memory budget.

``ByteCache`` wraps cachetools' ``LRUCache``/``LFUCache``/``FIFOCache`` with ``getsizeof``
so that ``max_bytes`` bounds the sum of the values' sizes (``len`` of bytes, ``nbytes`` of
arrays and tensors). A TTL applies to every policy: an entry older than ``ttl_s`` is a miss
and is dropped (cachetools' own ``TTLCache`` is LRU-only). An item larger than the whole
cache is an error (``CacheError``: the cache is smaller than one item), never a silent
no-op. Hits, misses and evictions are counted on the object and in Prometheus counters
``swarmlm_data_cache_{hits,misses,evictions}_total{cache,policy}`` and the gauges
``swarmlm_data_cache_bytes`` and ``swarmlm_data_cache_hit_rate`` in ``DATA_REGISTRY``, which a
node's ``/metrics`` appends when data caches exist in its process.

``MemoryBudget`` enforces ``max_memory_mb`` for the data side: caches registered with it
are shrunk, largest first, before an insert would take the process's resident memory
above the cap (``enforce(incoming=size)``, re-reading RSS after each eviction and handing
freed heap pages back with glibc's ``malloc_trim``). Memory that is not cache (model,
optimizer) cannot be evicted: when it alone is over the cap the caches are emptied and
``over_cap`` says so.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Literal

import cachetools
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from swarmlm.data.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_REGISTRY",
    "POLICIES",
    "ByteCache",
    "CacheError",
    "MemoryBudget",
    "process_budget",
    "render_metrics",
    "set_process_budget",
    "sizeof",
]

Policy = Literal["lru", "lfu", "fifo"]
POLICIES: tuple[Policy, ...] = ("lru", "lfu", "fifo")

# One registry for the process's data caches (not the process-global one, as NodeMetrics);
# a node's /metrics appends it when this module is loaded (render_metrics).
DATA_REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ["cache", "policy"]
_HITS = Counter("swarmlm_data_cache_hits", "data cache hits", _LABELS, registry=DATA_REGISTRY)
_MISSES = Counter("swarmlm_data_cache_misses", "data cache misses", _LABELS, registry=DATA_REGISTRY)
_EVICTIONS = Counter(
    "swarmlm_data_cache_evictions",
    "data cache evictions (capacity, TTL or memory cap)",
    _LABELS,
    registry=DATA_REGISTRY,
)
_BYTES = Gauge(
    "swarmlm_data_cache_bytes", "bytes held by a data cache", _LABELS, registry=DATA_REGISTRY
)
_HIT_RATE = Gauge(
    "swarmlm_data_cache_hit_rate",
    "hits / (hits + misses) since the cache was made",
    _LABELS,
    registry=DATA_REGISTRY,
)


def render_metrics() -> bytes:
    """The data caches' metrics in the Prometheus text format."""
    return generate_latest(DATA_REGISTRY)


def _load_malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: hands freed heap pages back to the OS, so that RSS shows
    an eviction (without it glibc keeps them for reuse and RSS does not move). A no-op on
    other C libraries."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def call() -> None:
        trim(0)

    return call


_malloc_trim = _load_malloc_trim()


class CacheError(DataError):
    """A cache is misconfigured (unknown policy, no room for one item)."""


def sizeof(value: Any) -> int:
    """Bytes a cached value holds: ``nbytes`` (numpy, torch via numel*element_size) or len."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size() * value.numel())
    if isinstance(value, tuple):
        return sum(sizeof(v) for v in value)
    return len(value)


class _Entry:
    __slots__ = ("expires", "size", "value")

    def __init__(self, value: Any, size: int, expires: float) -> None:
        self.value, self.size, self.expires = value, size, expires


class ByteCache:
    """A thread-safe cache bounded by the bytes of its values (see the module docstring)."""

    def __init__(
        self,
        max_bytes: int,
        policy: Policy = "lru",
        *,
        ttl_s: float | None = None,
        name: str = "cache",
        budget: MemoryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise CacheError(
                f"cache {name!r}: unknown policy {policy!r} (known: {', '.join(POLICIES)})"
            )
        if max_bytes < 1:
            raise CacheError(f"cache {name!r}: max_bytes must be >= 1, got {max_bytes}")
        if ttl_s is not None and not ttl_s > 0:
            raise CacheError(f"cache {name!r}: ttl_s must be > 0, got {ttl_s}")
        self.name, self.policy, self.ttl_s = name, policy, ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        cls = {
            "lru": cachetools.LRUCache,
            "lfu": cachetools.LFUCache,
            "fifo": cachetools.FIFOCache,
        }[policy]
        self._data: cachetools.Cache[Hashable, _Entry] = cls(
            maxsize=max_bytes, getsizeof=lambda e: e.size
        )
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        # bound metric children, looked up once (a labels() call per access costs a dict walk)
        self._m_hits = _HITS.labels(name, policy)
        self._m_misses = _MISSES.labels(name, policy)
        self._m_evictions = _EVICTIONS.labels(name, policy)
        self._m_bytes = _BYTES.labels(name, policy)
        _HIT_RATE.labels(name, policy).set_function(lambda: self.hit_rate)
        # a cache made without a budget of its own (the shards' chunk caches, deep inside
        # TokenShards.open) answers to the process's, when a node has set one
        self._budget = budget if budget is not None else _process_budget
        if self._budget is not None:
            self._budget.register(self)

    # -- mapping-like API ---------------------------------------------------------------
    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and self.ttl_s is not None and self._clock() >= entry.expires:
                del self._data[key]
                self.evictions += 1
                self._m_evictions.inc()
                entry = None
            if entry is None:
                self.misses += 1
                self._m_misses.inc()
                return None
            self.hits += 1
            self._m_hits.inc()
            return entry.value

    def put(self, key: Hashable, value: Any) -> None:
        size = sizeof(value)
        if size > self.max_bytes:
            raise CacheError(
                f"cache {self.name!r} of {self.max_bytes} bytes is smaller than one item "
                f"({size} bytes): raise its size or cache smaller items"
            )
        expires = self._clock() + self.ttl_s if self.ttl_s is not None else float("inf")
        if self._budget is not None:
            self._budget.enforce(incoming=size)  # make room first: RSS never passes the cap
        with self._lock:
            before = len(self._data)
            if key in self._data:
                del self._data[key]
                before -= 1
            self._data[key] = _Entry(value, size, expires)
            evicted = before + 1 - len(self._data)
            if evicted:
                self.evictions += evicted
                self._m_evictions.inc(evicted)
            self._m_bytes.set(self._data.currsize)

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value

    def evict_one(self) -> int:
        """Evict by the policy; returns the bytes freed (0 when empty)."""
        with self._lock:
            if not self._data:
                return 0
            _, entry = self._data.popitem()
            self.evictions += 1
            self._m_evictions.inc()
            self._m_bytes.set(self._data.currsize)
            return entry.size

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._m_bytes.set(0)

    @property
    def bytes(self) -> int:
        return int(self._data.currsize)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class MemoryBudget:
    """``max_memory_mb`` for the process: registered caches are shrunk while RSS is over."""

    def __init__(self, max_memory_mb: float, *, check_every: int = 16) -> None:
        if not max_memory_mb > 0:
            raise CacheError(f"max_memory_mb must be > 0, got {max_memory_mb}")
        self.cap_bytes = int(max_memory_mb * 2**20)
        self._caches: weakref.WeakSet[ByteCache] = weakref.WeakSet()
        self._proc = psutil.Process()
        self._calls = 0
        self.check_every = check_every
        self.evicted_bytes = 0
        self.over_cap = False

    def register(self, cache: ByteCache) -> None:
        self._caches.add(cache)

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def enforce(self, *, incoming: int = 0, force: bool = False) -> int:
        """Evict cache entries until RSS + ``incoming`` bytes fits under the cap; returns the
        bytes evicted. RSS is read (a system call) for every item of 64 KiB or more, else
        every ``check_every`` calls, and again after each eviction slice: freed memory does
        not always leave the process (allocator arenas), so estimates are not trusted."""
        self._calls += 1
        if not force and incoming < (64 << 10) and self._calls % self.check_every:
            return 0
        freed = 0
        rss = self.rss()
        while rss + incoming > self.cap_bytes:
            caches = sorted(self._caches, key=lambda c: c.bytes, reverse=True)
            if not caches or caches[0].bytes == 0:
                if not self.over_cap:
                    logger.warning(
                        "resident memory %.0f MiB (+%d bytes incoming) is above "
                        "max_memory_mb=%.0f with the data caches empty",
                        rss / 2**20,
                        incoming,
                        self.cap_bytes / 2**20,
                    )
                self.over_cap = True
                break
            need = rss + incoming - self.cap_bytes
            got = 0
            while got < need:
                n = caches[0].evict_one()
                if n == 0:
                    break
                got += n
            freed += got
            _malloc_trim()
            rss = self.rss()
        else:
            self.over_cap = False
        self.evicted_bytes += freed
        return freed


_process_budget: MemoryBudget | None = None


def set_process_budget(budget: MemoryBudget | None) -> MemoryBudget | None:
    """Make ``budget`` the one every :class:`ByteCache` created afterwards without its own
    answers to; returns the previous one. A node calls this with its ``max_memory_mb``, so
    data caches built anywhere below it (shard chunk caches, loaders) are bounded by the
    node's memory cap without each caller threading the budget through."""
    global _process_budget
    previous, _process_budget = _process_budget, budget
    return previous


def process_budget() -> MemoryBudget | None:
    """The budget set by :func:`set_process_budget` (None: caches are bounded only by their
    own ``max_bytes``)."""
    return _process_budget
