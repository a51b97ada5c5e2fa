"""The node's event bus: delivery to callbacks and subscribers, isolation from failing
listeners, bounded backlogs that drop the oldest, kind filters, history, thread safety."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from swarmlm.node.events import EVENT_KINDS, Event, EventBus

pytestmark = pytest.mark.timeout(30)


def test_callbacks_receive_published_events_in_order_with_increasing_seq() -> None:
    bus = EventBus()
    got: list[Event] = []
    bus.on(None, got.append)
    a = bus.publish("peer_joined", peer="p1", name="alpha")
    b = bus.publish("round_decided", round=1)
    assert got == [a, b]
    assert a.seq < b.seq
    assert a.data == {"peer": "p1", "name": "alpha"}
    assert bus.counts == {"peer_joined": 1, "round_decided": 1}


def test_event_json_carries_kind_seq_time_and_fields() -> None:
    ev = EventBus().publish("checkpoint_saved", round=3, path="/x")
    out = ev.to_json()
    assert out["kind"] == "checkpoint_saved"
    assert out["seq"] == ev.seq
    assert (out["round"], out["path"]) == (3, "/x")
    assert isinstance(out["time"], float)


def test_a_failing_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    got: list[str] = []

    def broken(ev: Event) -> None:
        raise RuntimeError("listener bug")

    bus.on(None, broken)
    bus.on(None, lambda ev: got.append(ev.kind))
    sub = bus.subscribe()
    with caplog.at_level(logging.ERROR, logger="swarmlm.node.events"):
        bus.publish("node_started")  # must not raise
    assert got == ["node_started"]
    assert sub._items[0].kind == "node_started"
    assert "event callback" in caplog.text
    assert "listener bug" in caplog.text


def test_callbacks_only_see_the_kinds_they_asked_for() -> None:
    bus = EventBus()
    rounds: list[int] = []
    peers: list[str] = []
    bus.on("round_decided", lambda ev: rounds.append(ev.data["round"]))
    bus.on(["peer_joined", "peer_left"], lambda ev: peers.append(ev.kind))
    bus.publish("round_decided", round=7)
    bus.publish("peer_joined", peer="a")
    bus.publish("peer_left", peer="a")
    bus.publish("checkpoint_saved", round=7, path="p")
    assert rounds == [7]
    assert peers == ["peer_joined", "peer_left"]


def test_unknown_event_kinds_are_refused_everywhere_naming_the_kind() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="unknown event kind 'round_done'"):
        bus.publish("round_done")
    with pytest.raises(ValueError, match="round_done"):
        bus.on("round_done", lambda ev: None)
    with pytest.raises(ValueError, match="round_done"):
        bus.subscribe(["round_decided", "round_done"])
    with pytest.raises(ValueError, match="round_done"):
        bus.recent("round_done")
    assert bus.counts == {}
    assert bus.recent() == []


def test_recent_keeps_a_bounded_history_filtered_by_kind() -> None:
    bus = EventBus(history=4)
    for r in range(1, 7):
        bus.publish("round_decided", round=r)
    bus.publish("peer_joined", peer="x")
    assert [e.data.get("round") for e in bus.recent()] == [4, 5, 6, None]
    assert [e.data["round"] for e in bus.recent("round_decided")] == [4, 5, 6]
    assert [e.data["round"] for e in bus.recent("round_decided", limit=2)] == [5, 6]
    assert bus.counts["round_decided"] == 6  # counts are totals, not the history


def test_a_slow_subscriber_keeps_the_newest_events_and_counts_what_it_dropped() -> None:
    async def scenario() -> None:
        bus = EventBus()
        sub = bus.subscribe("round_decided", size=3)
        for r in range(1, 8):
            bus.publish("round_decided", round=r)
            bus.publish("peer_joined", peer=str(r))  # filtered out: never counted as dropped
        assert sub.dropped == 4
        got = [await sub.get(timeout=1) for _ in range(3)]
        assert [e.data["round"] for e in got if e is not None] == [5, 6, 7]
        assert await sub.get(timeout=0.01) is None  # empty: times out, does not block

    asyncio.run(scenario())


def test_a_closed_subscription_ends_its_iteration_and_stops_receiving() -> None:
    async def scenario() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        sub = bus.subscribe()
        seen: list[str] = []

        async def consume() -> None:
            async for ev in sub:
                seen.append(ev.kind)

        task = asyncio.create_task(consume())
        bus.publish("node_started")
        for _ in range(1000):  # let the consumer take it (a few loop turns)
            if seen:
                break
            await asyncio.sleep(0)
        sub.close()
        await asyncio.wait_for(task, 5)
        bus.publish("node_stopping")
        assert seen == ["node_started"]
        assert sub.closed
        assert await sub.get() is None

    asyncio.run(scenario())


def test_events_published_from_worker_threads_are_delivered_on_the_bound_loop() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        bus = EventBus()
        bus.bind(loop)
        loop_thread = threading.get_ident()
        callback_threads: set[int] = set()
        bus.on(None, lambda ev: callback_threads.add(threading.get_ident()))
        sub = bus.subscribe("training_progress", size=1000)

        def worker(offset: int) -> None:
            for i in range(50):
                bus.publish("training_progress", step=offset + i)

        threads = [threading.Thread(target=worker, args=(k * 100,)) for k in range(4)]
        for t in threads:
            t.start()

        def join_all() -> None:
            for t in threads:
                t.join()

        await asyncio.to_thread(join_all)
        steps: list[int] = []
        while len(steps) < 200:
            ev = await sub.get(timeout=5)
            assert ev is not None, f"only {len(steps)} of 200 events arrived"
            steps.append(ev.data["step"])
        assert sorted(steps) == sorted(k * 100 + i for k in range(4) for i in range(50))
        assert callback_threads == {loop_thread}
        assert bus.counts["training_progress"] == 200
        seqs = [e.seq for e in bus.recent("training_progress")]
        assert len(set(seqs)) == 200  # every event got its own sequence number

    asyncio.run(scenario())


def test_publishing_after_the_bound_loop_closed_does_not_raise() -> None:
    bus = EventBus()
    loop = asyncio.new_event_loop()
    bus.bind(loop)
    loop.close()
    ev = bus.publish("node_stopping")
    assert bus.recent() == [ev]


def test_every_documented_kind_is_publishable() -> None:
    bus = EventBus()
    for kind in EVENT_KINDS:
        bus.publish(kind)
    assert set(bus.counts) == set(EVENT_KINDS)
    assert {"peer_joined", "round_decided", "config_reloaded", "attack_detected"} <= set(
        EVENT_KINDS
    )
