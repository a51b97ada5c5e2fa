"""The node's in-process event bus: typed events for components, user callbacks and the web.

Components publish facts (a peer joined, a round was decided, a task was finalised...) and
never wait for the listeners: callbacks run synchronously but a failing callback is logged
and skipped, and async subscribers (the dashboard's server-sent event streams) each get a
bounded queue that drops its oldest events when the subscriber falls behind, counting what
it dropped. So a stalled browser tab can slow nothing and grow nothing.

Publishing is thread-safe: training and store work runs in worker threads, and events from
there are handed to the event loop the bus was bound to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

EventKind = Literal[
    "node_started",
    "node_stopping",
    "peer_joined",
    "peer_left",
    "round_decided",
    "training_progress",
    "checkpoint_saved",
    "annotation_replicated",
    "task_finalised",
    "attack_detected",
    "config_reloaded",
    "config_rejected",
    "rlhf_phase",
]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
HISTORY = 512  # recent events kept for late subscribers (dashboard page loads)
SUBSCRIBER_QUEUE = 256


@dataclass(frozen=True)
class Event:
    """One fact. ``data`` holds JSON-serialisable fields specific to ``kind``."""

    kind: str
    data: dict[str, Any]
    seq: int
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "time": round(self.time, 3), **self.data}


class Subscription:
    """An async iterator of events with a bounded backlog (oldest dropped first)."""

    def __init__(self, bus: EventBus, kinds: frozenset[str] | None, size: int) -> None:
        self._bus = bus
        self.kinds = kinds
        self._items: deque[Event] = deque(maxlen=size)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _offer(self, ev: Event) -> None:
        if self.kinds is not None and ev.kind not in self.kinds:
            return
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(ev)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or once closed)."""
        while not self._items:
            if self.closed:
                return None
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._items.popleft()

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._bus._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.get()
            if ev is None:
                return
            yield ev


class EventBus:
    """Publish/subscribe for :class:`Event`. Bind it to the node's loop with :meth:`bind`."""

    def __init__(self, history: int = HISTORY) -> None:
        self._callbacks: list[tuple[frozenset[str] | None, Callable[[Event], None]]] = []
        self._subs: list[Subscription] = []
        self._history: deque[Event] = deque(maxlen=history)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts: dict[str, int] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def on(self, kinds: str | list[str] | None, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for events of ``kinds`` (None: all). Runs on the loop."""
        self._callbacks.append((_kinds(kinds), callback))

    def subscribe(
        self, kinds: str | list[str] | None = None, size: int = SUBSCRIBER_QUEUE
    ) -> Subscription:
        sub = Subscription(self, _kinds(kinds), size)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def recent(self, kinds: str | list[str] | None = None, limit: int = HISTORY) -> list[Event]:
        wanted = _kinds(kinds)
        with self._lock:
            items = [e for e in self._history if wanted is None or e.kind in wanted]
        return items[-limit:]

    def publish(self, kind: str, **data: Any) -> Event:
        """Record and deliver an event; safe from any thread, never raises for listeners."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(EVENT_KINDS)}")
        with self._lock:
            ev = Event(kind, data, next(self._seq))
            self._history.append(ev)
            self.counts[kind] = self.counts.get(kind, 0) + 1
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self._deliver, ev)
        else:
            self._deliver(ev)
        return ev

    def _deliver(self, ev: Event) -> None:
        for kinds, cb in list(self._callbacks):
            if kinds is not None and ev.kind not in kinds:
                continue
            try:
                cb(ev)
            except Exception:
                log.exception("event callback %r failed on %s", cb, ev.kind)
        for sub in list(self._subs):
            sub._offer(ev)


def _kinds(kinds: str | list[str] | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    out = frozenset([kinds] if isinstance(kinds, str) else kinds)
    unknown = out - set(EVENT_KINDS)
    if unknown:
        raise ValueError(f"unknown event kinds {sorted(unknown)}; known: {', '.join(EVENT_KINDS)}")
    return out
