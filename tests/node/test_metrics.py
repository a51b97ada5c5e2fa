"""Prometheus metrics of a node: what events and sources feed in is what a scrape reads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmlm.node.events import Event, EventBus
from swarmlm.node.metrics import MAX_LABEL_VALUES, NodeMetrics
from swarmlm.p2p.config import P2PConfig
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.p2p.transport import P2PNode

pytestmark = pytest.mark.timeout(60)


def scrape(m: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own text parser."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def fed() -> tuple[EventBus, NodeMetrics]:
    bus, m = EventBus(), NodeMetrics("n1", "full")
    m.attach(bus)
    return bus, m


def test_scrape_parses_and_carries_the_values_published_as_events() -> None:
    bus, m = fed()
    bus.publish(
        "round_decided",
        round=4,
        latency_s=0.8,
        members=["a", "b", "c"],
        accepted=2,
        val_loss=2.5,
        train_loss=2.7,
        reputation={"peer-a": 1.0, "peer-b": 0.25},
    )
    bus.publish("round_decided", round=5, latency_s=12.0, members=3, accepted=3, val_loss=2.4,
                train_loss=None, reputation={"peer-a": 0.9})  # fmt: skip
    bus.publish("training_progress", step=120, loss=2.61, tokens_per_s=6900.0)
    bus.publish("checkpoint_saved", path="/x/ckpt", round=5)
    bus.publish("task_finalised", task=7, task_set=1)
    bus.publish("task_finalised", task=8, task_set=1)
    bus.publish("annotation_replicated", count=40, source="peer-a")
    bus.publish("attack_detected", peer="peer-b", reason="outlier_update")
    bus.publish("config_reloaded", fields=["log_level"])
    bus.publish("config_rejected", error="p2p_port is not hot-reloadable")
    bus.publish("peer_joined", peer="peer-c")
    bus.publish("peer_left", peer="peer-c")

    s = scrape(m)
    assert value(s, "swarmlm_rounds_decided_total") == 2
    assert value(s, "swarmlm_round_latency_seconds_count") == 2
    assert value(s, "swarmlm_round_latency_seconds_sum") == pytest.approx(12.8)
    assert value(s, "swarmlm_round_latency_seconds_bucket", le="1.0") == 1
    assert value(s, "swarmlm_round_last") == 5
    assert value(s, "swarmlm_round_members") == 3
    assert value(s, "swarmlm_validation_loss") == 2.4
    assert value(s, "swarmlm_training_loss") == 2.61
    assert value(s, "swarmlm_training_step") == 120
    assert value(s, "swarmlm_training_tokens_per_second") == 6900.0
    assert value(s, "swarmlm_checkpoints_saved_total") == 1
    assert value(s, "swarmlm_tasks_finalised_total") == 2
    assert value(s, "swarmlm_annotations_replicated_total") == 40
    assert value(s, "swarmlm_attacks_detected_total", reason="outlier_update") == 1
    assert value(s, "swarmlm_config_reloads_total", result="applied") == 1
    assert value(s, "swarmlm_config_reloads_total", result="rejected") == 1
    assert value(s, "swarmlm_peer_membership_changes_total", event="joined") == 1
    assert value(s, "swarmlm_events_total", kind="task_finalised") == 2
    # reputation is the latest round's, not a merge of all rounds
    assert value(s, "swarmlm_peer_reputation", peer="peer-a") == 0.9
    assert ("swarmlm_peer_reputation", (("peer", "peer-b"),)) not in s
    assert value(s, "swarmlm_node_info", node_id="n1", type="full") == 1
    assert value(s, "swarmlm_process_resident_memory_bytes") > 10e6
    assert value(s, "swarmlm_process_threads") >= 1


def test_scrape_reads_pull_sources_and_survives_a_failing_one() -> None:
    _, m = fed()
    stats = {
        "connected": 2,
        "known_peers": 3,
        "bytes_sent_by_kind": {"propose": 1000, "blob": 5000},
        "bytes_received_by_kind": {"vote": 700},
        "dropped": {"bad_signature": 4, "replay": 1},
    }
    m.set_sources(
        p2p=lambda: stats,
        store=lambda: {"annotations": 12, "tasks": 30, "tasks_finalised": 9},
        reputation=lambda: 1 / 0,
    )
    s = scrape(m)
    assert value(s, "swarmlm_p2p_peers_connected") == 2
    assert value(s, "swarmlm_p2p_sent_bytes_total", kind="blob") == 5000
    assert value(s, "swarmlm_p2p_received_bytes_total", kind="vote") == 700
    assert value(s, "swarmlm_p2p_dropped_messages_total", reason="bad_signature") == 4
    assert value(s, "swarmlm_store_annotations") == 12
    assert value(s, "swarmlm_store_tasks_finalised") == 9
    assert value(s, "swarmlm_metric_source_errors_total", source="reputation") == 1

    m.set_sources(store=None)
    assert ("swarmlm_store_annotations", ()) not in scrape(m)
    with pytest.raises(ValueError, match="unknown metric sources \\['disk'\\]"):
        m.set_sources(disk=lambda: 1)
    with pytest.raises(TypeError, match="'p2p' must be callable"):
        m.set_sources(p2p=stats)  # type: ignore[arg-type]


def test_two_nodes_in_one_process_keep_separate_registries() -> None:
    bus_a, a = fed()
    _, b = fed()
    bus_a.publish("checkpoint_saved", path="p", round=1)
    assert value(scrape(a), "swarmlm_checkpoints_saved_total") == 1
    assert value(scrape(b), "swarmlm_checkpoints_saved_total") == 0


def test_label_values_from_the_network_are_capped_and_counts_kept() -> None:
    _, m = fed()
    dropped = {f"reason-{i}": 1 for i in range(MAX_LABEL_VALUES + 50)}
    m.set_sources(p2p=lambda: {"dropped": dropped})
    s = scrape(m)
    reasons = {dict(k[1])["reason"] for k in s if k[0] == "swarmlm_p2p_dropped_messages_total"}
    assert len(reasons) == MAX_LABEL_VALUES + 1
    assert value(s, "swarmlm_p2p_dropped_messages_total", reason="other") == 50
    total = sum(v for k, v in s.items() if k[0] == "swarmlm_p2p_dropped_messages_total")
    assert total == len(dropped)


def test_events_with_malformed_fields_are_counted_without_bogus_values() -> None:
    bus, m = fed()
    bus.publish("round_decided", round="x", latency_s=float("nan"), members=None, accepted=True)
    bus.publish("training_progress", step=None, loss="high", tokens_per_s=-1.0)
    bus.publish("annotation_replicated", count="many", source=None)
    s = scrape(m)
    assert value(s, "swarmlm_rounds_decided_total") == 1
    assert value(s, "swarmlm_round_latency_seconds_count") == 0
    assert value(s, "swarmlm_annotations_replicated_total") == 0
    assert m.last_loss is None


def test_training_feed_rate_and_thinned_curve() -> None:
    m = NodeMetrics()
    t0 = 1_000_000.0
    for i in range(1000):
        m.observe(
            Event("training_progress", {"step": i, "loss": 5.0 - i / 1000}, i + 1, t0 + i / 10)
        )
    assert m.step_rate(now=t0 + 100) == pytest.approx(10.0, rel=0.02)
    assert m.step_rate(now=t0 + 1000) == 0.0  # nothing within the window: stalled
    feed = m.training_feed(max_points=100)
    assert len(feed["loss_curve"]) <= 101
    assert feed["loss_curve"][-1] == [999, pytest.approx(4.001)]
    assert feed["step"] == 999


def test_transport_counts_bytes_by_message_kind_and_metrics_expose_them() -> None:
    async def go() -> None:
        cfg = P2PConfig(host="127.0.0.1", port=0)
        a, b = P2PNode(NodeIdentity.generate(), cfg), P2PNode(NodeIdentity.generate(), cfg)
        await a.start()
        await b.start()
        try:
            await a.connect("127.0.0.1", b.port, expect=b.node_id)
            got = asyncio.Event()
            b.on("status_req", lambda msg, peer: got.set())
            assert a.send(b.node_id, a.sign("status_req", {}))
            await asyncio.wait_for(got.wait(), 10)
            sent, received = a.stats()["bytes_sent_by_kind"], b.stats()["bytes_received_by_kind"]
            assert sent["status_req"] > 0
            assert received["status_req"] > 0
            m = NodeMetrics()
            m.set_sources(p2p=a.stats)
            s = scrape(m)
            assert value(s, "swarmlm_p2p_sent_bytes_total", kind="status_req") == sent["status_req"]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(go(), 30))
