"""An asyncio event loop whose clock is virtual: time jumps to the next timer when idle.

Why our own ~50 lines rather than looptime/aiotools: the simulator needs nothing but a loop
whose ``time()`` is a number it controls, and the standard selector loop already runs every
ready callback in FIFO order and its timers from a heap; only the wait in ``select`` is
real. Replacing the selector with one that *advances the clock by the timeout* instead of
sleeping makes ``asyncio.sleep``, ``wait_for`` and every protocol timer virtual, runs a
minute of protocol time in milliseconds, and keeps the order of events a pure function of
the program (no threads, no wall clock). A loop with nothing scheduled and nothing ready
is a deadlock; it raises :class:`SimulatorDeadlockError` instead of blocking forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any

from swarmlm.sim.errors import SimulatorDeadlockError

VIRTUAL_EPOCH = 1_000.0  # where virtual monotonic time starts (never 0: "long ago" defaults)
# A timer due later than now fires at least this much later. Why: code that waits for
# "the rest" of a deadline (``wait_for(x, deadline - now)``) can be left with a remainder
# below the float resolution of the clock; on a real loop wall time still passes, in
# virtual time such a wait fires at the same instant forever (a livelock, found at once).
TIMER_RESOLUTION = 1e-6
# Which simulated node a task works for: set in the context a node's main task is created
# in, inherited by every task it creates. A crash cancels the node's tasks (a killed process
# runs nothing more); the network delivers messages in a context without an owner, so a
# task a handler spawns is never charged to the sender.
OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "swarmlm_sim_owner", default=None
)


class _VirtualSelector(selectors.BaseSelector):
    """Holds registrations (the loop's self-pipe) but never waits: ``select(timeout)``
    moves the owning loop's clock forward by ``timeout`` and reports no I/O."""

    def __init__(self) -> None:
        self._map: dict[Any, selectors.SelectorKey] = {}
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise SimulatorDeadlockError(
                f"nothing scheduled at virtual t={self.loop.time():.6f}: every task waits "
                "on an event no timer or message will set"
            )
        if timeout > 0:
            self.loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop in virtual time (single thread, deterministic order)."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        self._vtime = VIRTUAL_EPOCH
        self._owned: dict[str, dict[asyncio.Task[Any], None]] = {}
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._vtime

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        if 0 < delay < TIMER_RESOLUTION:
            delay = TIMER_RESOLUTION
        return super().call_later(delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        now = self._vtime
        if now < when < now + TIMER_RESOLUTION:
            when = now + TIMER_RESOLUTION
        return super().call_at(when, callback, *args, context=context)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        task = super().create_task(coro, name=name, context=context)
        owner = context.get(OWNER) if context is not None else OWNER.get()
        if owner is not None:
            owned = self._owned.setdefault(owner, {})
            owned[task] = None
            task.add_done_callback(owned.pop)
        return task

    def tasks_of(self, owner: str) -> list[asyncio.Task[Any]]:
        """The unfinished tasks working for ``owner``, oldest first (a deterministic order)."""
        return [t for t in self._owned.get(owner, {}) if not t.done()]

    def advance(self, seconds: float) -> None:
        """Move the clock forward (only the selector calls this, when the loop is idle)."""
        if seconds < 0:
            from swarmlm.sim.errors import SimulatorInvariantError

            raise SimulatorInvariantError(f"virtual clock asked to go back {seconds} s")
        self._vtime += seconds
