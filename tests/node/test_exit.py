"""A stopped node exits although a worker thread it cannot interrupt is still running."""

from __future__ import annotations

import asyncio
import threading

from swarmlm.node.cli import run_abandoning_threads


def test_a_busy_worker_thread_does_not_hold_the_stopped_node() -> None:
    """``asyncio.run`` would join the thread (an evaluation of the whole held-out set, a
    local phase) before returning; the node's runner gives it the grace period only."""
    release = threading.Event()
    started = threading.Event()

    def evaluate() -> None:  # stands for work the node cannot interrupt
        started.set()
        release.wait(60)

    async def node() -> int:
        asyncio.get_running_loop().run_in_executor(None, evaluate)
        await asyncio.to_thread(started.wait, 10)
        return 3

    try:
        assert run_abandoning_threads(node(), grace=0.1) == 3
        busy = [t for t in threading.enumerate() if t.name.startswith("swarmlm-node")]
        assert any(t.is_alive() for t in busy)  # left behind, not joined
    finally:
        release.set()


def test_threads_that_finish_within_the_grace_period_are_joined() -> None:
    done: list[int] = []

    async def node() -> int:
        await asyncio.to_thread(done.append, 1)
        return 0

    assert run_abandoning_threads(node(), grace=5.0) == 0
    assert done == [1]
