"""Ops endpoints of a node: per-component health, /metrics, the event stream, `swarmlm status`.

Streams and the status command run against a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from node_fakes import FakeNodeView, ServerThread, read_events
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from swarmlm.node.metrics import NodeMetrics
from swarmlm.node.ops import (
    component,
    create_ops_app,
    disk_component,
    event_streams,
    health_report,
    p2p_component,
    rounds_component,
    store_component,
    training_component,
)
from swarmlm.node.status import health_url, status_main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def view() -> FakeNodeView:
    return FakeNodeView()


@pytest.fixture
def server(view: FakeNodeView) -> Iterator[ServerThread]:
    app = create_ops_app(view)
    event_streams(app).heartbeat_s = 0.2
    srv = ServerThread(app, view.bus)
    yield srv
    srv.stop()


# -- health ---------------------------------------------------------------------------------
def test_health_reports_each_component_and_ok_overall(view: FakeNodeView) -> None:
    r = TestClient(create_ops_app(view)).get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert set(body["components"]) == {"p2p", "store", "training", "disk"}
    assert body["components"]["p2p"]["peers_connected"] == 2


def test_a_required_component_down_gives_503_and_an_optional_one_degrades(
    view: FakeNodeView,
) -> None:
    client = TestClient(create_ops_app(view))
    view.components["training"] = component("down", False, error="optimizer diverged")
    r = client.get("/api/health")
    assert (r.status_code, r.json()["status"]) == (200, "degraded")
    view.components["store"] = component("down", True, error="OperationalError: disk I/O error")
    r = client.get("/api/health")
    assert r.status_code == 503
    assert r.json()["status"] == "down"
    assert r.json()["components"]["store"]["error"].startswith("OperationalError")


def test_a_health_check_that_raises_is_reported_down(view: FakeNodeView) -> None:
    view.fail_health = True
    r = TestClient(create_ops_app(view)).get("/api/health")
    assert r.status_code == 503
    assert r.json() == {"status": "down", "error": "health check failed: RuntimeError"}


def test_component_helpers_judge_peers_rounds_store_training_and_disk(tmp_path: Path) -> None:
    assert p2p_component(None)["status"] == "down"
    assert p2p_component({"connected": 0, "known_peers": 2})["status"] == "degraded"
    assert p2p_component({"connected": 3, "known_peers": 3}, min_peers=2)["status"] == "ok"

    m = NodeMetrics()
    now = time.time()
    assert rounds_component(m, 60, started_at=now - 10, now=now)["status"] == "ok"
    assert rounds_component(m, 60, started_at=now - 100, now=now)["status"] == "degraded"
    m.last_round_number, m.last_round_at = 7, now - 5
    rc = rounds_component(m, 60, started_at=now - 1000, now=now)
    assert (rc["status"], rc["last_round"], rc["round_age_s"]) == ("ok", 7, 5.0)
    assert training_component(m, 30, started_at=now - 100, now=now)["status"] == "degraded"

    def broken() -> dict[str, str]:
        raise ConnectionError("could not connect to server")

    assert store_component(broken)["status"] == "down"
    ok = store_component(lambda: {"database": "sqlite", "signer": "ab" * 32, "x": {"a": 1}})
    assert (ok["status"], ok["database"]) == ("ok", "sqlite")
    assert "x" not in ok  # only scalar details are kept

    assert disk_component(tmp_path)["status"] == "ok"
    low = disk_component(tmp_path, min_free_bytes=1 << 62, down_below_bytes=0)
    assert low["status"] == "degraded"
    assert low["free_bytes"] > 0
    assert disk_component(tmp_path, min_free_bytes=1 << 62, down_below_bytes=1 << 61)["status"] == (
        "down"
    )
    assert disk_component(tmp_path / "missing")["status"] == "down"

    report = health_report({"a": component("ok", True), "b": component("degraded", False)})
    assert report["status"] == "degraded"
    with pytest.raises(ValueError, match="component status must be one of"):
        component("fine", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"components \['b'\] have no valid status"):
        health_report({"a": component("ok", True), "b": {"status": "meh"}})


# -- metrics and feeds -----------------------------------------------------------------------
def test_metrics_endpoint_serves_the_text_format_prometheus_parses(view: FakeNodeView) -> None:
    view.bus.publish("training_progress", step=3, loss=3.25, tokens_per_s=100.0)
    r = TestClient(create_ops_app(view)).get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if not s.labels
    }
    assert samples["swarmlm_training_loss"] == 3.25


def test_standalone_feeds_serve_loopback_clients_only(view: FakeNodeView) -> None:
    client = TestClient(create_ops_app(view), client=("127.0.0.1", 40000))
    assert client.get("/api/node/network").json()["self"]["name"] == "fake"
    assert client.get("/api/node/training").json()["state"] == "training"
    assert client.get("/api/node/annotation").json()["enabled"] is True
    remote = TestClient(create_ops_app(view), client=("192.0.2.7", 40000))
    assert remote.get("/api/health").status_code == 200
    assert remote.get("/metrics").status_code == 200
    for path in ("/api/node/network", "/api/events"):
        r = remote.get(path)
        assert r.status_code == 403
        assert "loopback" in r.json()["detail"]
    opened = TestClient(create_ops_app(view, open_feeds=True), client=("192.0.2.7", 40000))
    assert opened.get("/api/node/training").status_code == 200


# -- server-sent events ---------------------------------------------------------------------
def test_event_stream_delivers_published_events_in_order(
    server: ServerThread, view: FakeNodeView
) -> None:
    with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        for i in range(5):
            view.bus.publish("training_progress", step=i, loss=3.0 - i / 10, tokens_per_s=1.0)
        got = read_events(lines, 5)
    assert [e["event"] for e in got] == ["training_progress"] * 5
    assert [json.loads(e["data"])["step"] for e in got] == [0, 1, 2, 3, 4]
    ids = [int(e["id"]) for e in got]
    assert ids == sorted(set(ids))
    assert len(ids) == 5


def test_reconnecting_with_last_event_id_replays_only_what_was_missed(
    server: ServerThread, view: FakeNodeView
) -> None:
    first = [view.bus.publish("peer_joined", peer=f"p{i}") for i in range(3)]
    missed = [view.bus.publish("peer_left", peer=f"p{i}") for i in range(2)]
    headers = {"Last-Event-ID": str(first[-1].seq)}
    with httpx.stream("GET", f"{server.url}/api/events", headers=headers, timeout=5) as r:
        lines = r.iter_lines()
        got = read_events(lines, 2)
        view.bus.publish("peer_joined", peer="p9")
        got += read_events(lines, 1)
    assert [int(e["id"]) for e in got[:2]] == [e.seq for e in missed]
    assert json.loads(got[2]["data"])["peer"] == "p9"


def test_a_new_client_gets_recent_history_filtered_by_kind(
    server: ServerThread, view: FakeNodeView
) -> None:
    for i in range(4):
        view.bus.publish("checkpoint_saved", path=f"c{i}", round=i)
        view.bus.publish("peer_joined", peer=f"p{i}")
    url = f"{server.url}/api/events?kinds=checkpoint_saved&replay=2"
    with httpx.stream("GET", url, timeout=5) as r:
        got = read_events(r.iter_lines(), 2)
    assert [json.loads(e["data"])["path"] for e in got] == ["c2", "c3"]


def test_events_forgotten_before_reconnect_are_announced_as_a_gap(view: FakeNodeView) -> None:
    view.bus = type(view.bus)(history=4)
    for i in range(10):
        view.bus.publish("peer_joined", peer=f"p{i}")
    srv = ServerThread(create_ops_app(view), view.bus)
    try:
        headers = {"Last-Event-ID": "2"}
        with httpx.stream("GET", f"{srv.url}/api/events", headers=headers, timeout=5) as r:
            got = read_events(r.iter_lines(), 2)
    finally:
        srv.stop()
    assert got[0]["event"] == "gap"
    assert json.loads(got[0]["data"]) == {"after": 2, "next": 7}
    assert got[1]["id"] == "7"


def test_bad_stream_parameters_are_refused_with_the_reason(view: FakeNodeView) -> None:
    client = TestClient(create_ops_app(view), client=("127.0.0.1", 40000))
    r = client.get("/api/events?kinds=round_decided,coffee_break")
    assert r.status_code == 422
    assert "coffee_break" in r.json()["detail"]
    r = client.get("/api/events", headers={"Last-Event-ID": "yesterday"})
    assert r.status_code == 422
    assert "Last-Event-ID" in r.json()["detail"]


def test_streams_end_on_node_stopping_on_close_and_when_the_client_leaves(
    server: ServerThread, view: FakeNodeView
) -> None:
    streams = event_streams(server.app)
    with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as r:
        lines = r.iter_lines()
        view.bus.publish("node_stopping")
        assert read_events(lines, 1)[0]["event"] == "node_stopping"
        assert list(lines) == []  # the server ended the response

    url = f"{server.url}/api/events?replay=0&kinds=peer_joined"
    with httpx.stream("GET", url, timeout=5) as r:
        lines = r.iter_lines()
        view.bus.publish("peer_joined", peer="w")
        assert read_events(lines, 1)[0]["event"] == "peer_joined"
        view.bus.publish("node_stopping")
        assert read_events(lines, 1) == []  # ended without sending the unwanted kind

    with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as r:
        lines = r.iter_lines()
        view.bus.publish("peer_joined", peer="x")
        read_events(lines, 1)
        from swarmlm.node.ops import close_event_streams

        server.call(close_event_streams, server.app)
        assert list(lines) == []

    with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as r:
        lines = r.iter_lines()
        view.bus.publish("peer_joined", peer="y")
        read_events(lines, 1)
        assert len(streams.open) == 1
    deadline = time.monotonic() + 5
    while streams.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not streams.open, "the subscription outlived its client"


def test_open_streams_are_bounded(server: ServerThread, view: FakeNodeView) -> None:
    event_streams(server.app).limit = 1
    with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as r:
        lines = r.iter_lines()  # kept referenced: a collected iterator closes the response
        view.bus.publish("peer_joined", peer="x")
        read_events(lines, 1)
        with httpx.stream("GET", f"{server.url}/api/events?replay=0", timeout=5) as second:
            assert second.status_code == 503
            assert "too many event streams" in json.loads(second.read())["detail"]


# -- swarmlm status -------------------------------------------------------------------------
def run_status(url: str) -> tuple[int, str]:
    console = Console(record=True, width=160, force_terminal=False)
    code = status_main(url, 5.0, console=console)
    return code, console.export_text()


def test_status_prints_components_and_exits_by_health(
    server: ServerThread, view: FakeNodeView
) -> None:
    code, out = run_status(server.url)
    assert code == 0
    assert "fake full: ok" in out
    for name in ("p2p (required)", "store (required)", "training", "disk"):
        assert name in out
    assert "peers_connected=2" in out

    console = Console(record=True, width=160, force_terminal=False)
    assert status_main(server.url, 5.0, as_json=True, console=console) == 0
    assert json.loads(console.export_text())["components"]["store"]["round_trip_ms"] == 0.4

    view.components["training"] = component("degraded", False, step_rate=0.0)
    code, out = run_status(f"127.0.0.1:{server.port}")
    assert code == 1
    assert "degraded" in out

    view.components["disk"] = component("down", True, free_bytes=1024)
    code, out = run_status(server.url + "/")
    assert code == 1
    assert "free_bytes=1024" in out


def test_status_prints_the_nodes_warnings_and_they_do_not_fail_the_probe(
    server: ServerThread, view: FakeNodeView
) -> None:
    warning = "n = 3 members tolerate no faulty or crashed member (need n >= 4 for f = 1)"
    healthy = view.health
    view.health = lambda: {**healthy(), "warnings": [warning]}  # type: ignore[method-assign]
    code, out = run_status(server.url)
    assert code == 0
    assert f"warning: {warning}" in out


def test_status_of_an_unreachable_or_foreign_server_exits_2(server: ServerThread) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    code, out = run_status(f"http://127.0.0.1:{free}")
    assert code == 2
    assert f"unreachable: cannot reach http://127.0.0.1:{free}/api/health" in out

    code, out = run_status(f"{server.url}/elsewhere")  # answers 404, with no health in it
    assert code == 2
    assert "HTTP 404 without a health status" in out

    code, out = run_status("ftp://example")
    assert code == 2
    assert "not an http(s) URL" in out
    assert health_url("node1:8080") == "http://node1:8080/api/health"
