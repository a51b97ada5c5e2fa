"""Load balancing of work items (data shards, annotation tasks) among workers (peers,
annotators): round-robin, least-loaded and performance-based, behind one interface.

A balancer tracks what it handed out: ``assign(item, cost)`` returns the worker chosen,
``complete(item, seconds)`` releases the item's cost from its worker and (for the
performance policy) feeds the measured rate back. Workers join with ``add_worker`` and leave
with ``remove_worker``, which returns the items they held so the caller can re-assign them.
Every choice is deterministic given the call sequence (ties broken by worker name), so peers
replaying the same decided events agree on the assignment.

* ``round_robin``: workers in name order, in turn, whatever they hold.
* ``least_loaded``: the worker with the least outstanding cost (items weighted by ``cost``).
* ``performance``: the worker expected to *finish* the item first: ``(outstanding + cost) /
  rate``, ``rate`` the EWMA of measured cost per second; a worker not yet measured is
  assumed to be as fast as the median measured worker (so newcomers get work and a rate).
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from swarmlm.data.errors import DataError

__all__ = ["BALANCE_POLICIES", "BalancePolicy", "Balancer", "assign_all"]

BalancePolicy = Literal["round_robin", "least_loaded", "performance"]
BALANCE_POLICIES: tuple[BalancePolicy, ...] = ("round_robin", "least_loaded", "performance")


@dataclass
class _Worker:
    name: str
    load: float = 0.0
    rate: float | None = None  # cost units per second (EWMA)
    items: dict[Hashable, float] = field(default_factory=dict)
    done: int = 0


class Balancer:
    """Assigns items to workers by ``policy`` (see the module docstring)."""

    def __init__(
        self, workers: Iterable[str], policy: BalancePolicy = "least_loaded", *, ewma: float = 0.3
    ) -> None:
        if policy not in BALANCE_POLICIES:
            raise DataError(
                f"unknown balancing policy {policy!r} (known: {', '.join(BALANCE_POLICIES)})"
            )
        if not 0 < ewma <= 1:
            raise DataError(f"ewma must be in (0, 1], got {ewma}")
        self.policy = policy
        self.ewma = ewma
        self._workers: dict[str, _Worker] = {}
        self._owner: dict[Hashable, str] = {}
        self._next = 0
        for w in workers:
            self.add_worker(w)

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def add_worker(self, name: str) -> None:
        if name in self._workers:
            raise DataError(f"worker {name!r} is already known")
        self._workers[name] = _Worker(name)

    def remove_worker(self, name: str) -> list[Hashable]:
        """Forget ``name``; returns the items it held (unassigned now, to re-assign)."""
        w = self._workers.pop(name, None)
        if w is None:
            raise DataError(f"unknown worker {name!r}")
        for item in w.items:
            del self._owner[item]
        return list(w.items)

    def load(self, name: str) -> float:
        return self._workers[name].load

    def rate(self, name: str) -> float | None:
        return self._workers[name].rate

    def owner(self, item: Hashable) -> str | None:
        return self._owner.get(item)

    def set_rate(self, name: str, rate: float) -> None:
        """Adopt a rate measured elsewhere (cost units per second), e.g. a swarm round's
        decided samples per second, replacing the EWMA of :meth:`complete`."""
        if name not in self._workers:
            raise DataError(f"unknown worker {name!r}")
        if not rate > 0:
            raise DataError(f"rate of {name!r} must be > 0, got {rate}")
        self._workers[name].rate = float(rate)

    def _choose(self, cost: float) -> _Worker:
        names = self.workers
        if self.policy == "round_robin":
            w = self._workers[names[self._next % len(names)]]
            self._next += 1
            return w
        if self.policy == "least_loaded":
            return min((self._workers[n] for n in names), key=lambda w: (w.load, w.name))
        known = [w.rate for w in self._workers.values() if w.rate is not None]
        default = statistics.median(known) if known else 1.0
        return min(
            (self._workers[n] for n in names),
            key=lambda w: ((w.load + cost) / (w.rate if w.rate is not None else default), w.name),
        )

    def assign(self, item: Hashable, cost: float = 1.0) -> str:
        """The worker that gets ``item`` (of ``cost`` > 0 units); raises with no workers."""
        if not self._workers:
            raise DataError(f"cannot assign {item!r}: no workers")
        if not cost > 0:
            raise DataError(f"cost of {item!r} must be > 0, got {cost}")
        if item in self._owner:
            raise DataError(f"{item!r} is already assigned to {self._owner[item]!r}")
        w = self._choose(cost)
        w.load += cost
        w.items[item] = cost
        self._owner[item] = w.name
        return w.name

    def complete(self, item: Hashable, seconds: float | None = None) -> str:
        """Release ``item``; with ``seconds`` update its worker's measured rate."""
        name = self._owner.pop(item, None)
        if name is None:
            raise DataError(f"{item!r} is not assigned")
        w = self._workers[name]
        cost = w.items.pop(item)
        w.load = max(0.0, w.load - cost)
        w.done += 1
        if seconds is not None:
            if not seconds > 0:
                raise DataError(f"seconds must be > 0, got {seconds}")
            r = cost / seconds
            w.rate = r if w.rate is None else (1 - self.ewma) * w.rate + self.ewma * r
        return name


def assign_all(
    items: Iterable[Hashable], workers: Iterable[str], policy: BalancePolicy = "least_loaded"
) -> dict[str, list[Hashable]]:
    """One-shot: every item (cost 1) assigned by ``policy``; {worker: items}."""
    b = Balancer(workers, policy)
    out: dict[str, list[Hashable]] = {w: [] for w in b.workers}
    for item in items:
        out[b.assign(item)].append(item)
    return out
