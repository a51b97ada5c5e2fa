"""The node dashboard inside the annotation app: admin-only pages and feeds, live updates.

The app is the real one over a real SQLite store, with a node view built from a real event
bus and real metrics (the node itself is faked: its peers and rounds are fixed data).
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from web_helpers import FAST_HASHER, PASSWORD, api_token, login, make_settings, register

from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.node.events import EventBus
from swarmlm.node.metrics import NodeMetrics
from swarmlm.node.ops import component, health_report, web_attachment
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import create_app
from swarmlm.web.admin import line_chart

pytestmark = pytest.mark.timeout(60)


@dataclass
class View:
    bus: EventBus = field(default_factory=EventBus)
    metrics: NodeMetrics = field(default_factory=lambda: NodeMetrics("web1", "annotation"))
    store_down: bool = False

    def __post_init__(self) -> None:
        self.metrics.attach(self.bus)

    def health(self) -> dict[str, Any]:
        store = component("down", True, error="gone") if self.store_down else component("ok", True)
        return health_report({"store": store, "p2p": component("ok", True, peers_connected=1)})

    def network(self) -> dict[str, Any]:
        return {
            "self": {"peer_id": "c" * 64, "name": "web1", "type": "annotation"},
            "peers": [
                {
                    "id": "a" * 64,
                    "addr": "127.0.0.1:7001",
                    "score": 1.0,
                    "state": "connected",
                    "name": "trainer-<1>",
                    "type": "training",
                    "reputation": 0.75,
                }
            ],
            "rounds": {"last_decided": 12, "latency_p50_ms": 840.0},
            "stats": {
                "connected": 1,
                "known_peers": 1,
                "bytes_sent": 4096,
                "bytes_received": 2048,
                "bytes_sent_by_kind": {"propose": 4096},
                "bytes_received_by_kind": {"vote": 2048},
                "dropped": {"bad_signature": 3},
            },
        }

    def training(self) -> dict[str, Any]:
        return {
            "state": "training",
            "curve": [
                {"round": r, "train_loss": 4.0 - r / 10, "val_loss": 4.1 - r / 10}
                for r in range(1, 11)
            ],
            "last_round": {"round": 10},
        }

    def annotation(self) -> dict[str, Any]:
        return {"enabled": True, "task_sets": [], "stats": {}}


@dataclass
class NodeWeb:
    app: Any
    view: View
    store: CurationStore

    def client(self) -> TestClient:
        return TestClient(self.app)


@pytest.fixture
def node_web(tmp_path: Path) -> Iterator[NodeWeb]:
    store = CurationStore.open(
        f"sqlite:///{tmp_path / 'web.db'}",
        NodeIdentity.generate(),
        rng=random.Random(0),
        password_hasher=FAST_HASHER,
    )
    ts = store.create_task_set(
        "sentiment", {"kind": "single_choice", "choices": ["pos", "neg"]}, k=1, gold_share=0.0
    )
    store.add_tasks(ts.id, [TaskInput(content=f"review {i}") for i in range(4)])
    store.create_annotator("admin", PASSWORD, role="admin")
    view = View()
    yield NodeWeb(
        create_app(store, make_settings(tmp_path), node=web_attachment(view)), view, store
    )
    store.close()


PAGES = ("/admin/node/network", "/admin/node/training", "/admin/node/annotation")


def test_dashboard_pages_and_feeds_require_an_administrator(node_web: NodeWeb) -> None:
    anon = node_web.client()
    for page in PAGES:
        r = anon.get(page, follow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"] == "/login"
    for feed in ("/api/node/network", "/api/events"):
        assert anon.get(feed).status_code == 401
    user = node_web.client()
    register(user, "annie")
    for page in PAGES:
        assert user.get(page).status_code == 403
    token = api_token(user, "annie")
    r = user.get("/api/node/training", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403


def test_health_and_metrics_are_open_and_per_component_when_a_node_is_attached(
    node_web: NodeWeb,
) -> None:
    client = node_web.client()
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert set(body["components"]) == {"store", "p2p"}
    node_web.view.store_down = True
    assert client.get("/api/health").status_code == 503
    node_web.view.bus.publish("task_finalised", task=1, task_set=1)
    r = client.get("/metrics")
    names = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert names["swarmlm_tasks_finalised_total"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second /api/health would warn: duplicate operation
        assert "/api/health" in client.get("/openapi.json").json()["paths"]


def test_network_page_shows_peers_reputation_rounds_and_transport(node_web: NodeWeb) -> None:
    node_web.view.bus.publish(
        "round_decided",
        round=12,
        latency_s=0.84,
        members=3,
        accepted=3,
        val_loss=3.2,
        train_loss=3.3,
        reputation={"a" * 12: 0.75},
    )
    node_web.view.bus.publish("attack_detected", peer="b" * 12, reason="<script>x</script>")
    client = node_web.client()
    login(client, "admin")
    html = client.get("/admin/node/network").text
    assert 'id="live"' in html
    assert 'data-src="/admin/node/network?part=live"' in html
    assert "/static/dashboard.js" in html
    assert "aaaaaaaaaaaa" in html
    assert "trainer-&lt;1&gt;" in html  # escaped peer name
    assert "</svg> 0.750" in html  # reputation bar and value
    assert "<td>12</td>" in html  # decided round
    assert "<td>propose</td><td>4096</td>" in html
    assert "<td>bad_signature</td><td>3</td>" in html
    assert "<script>x" not in html  # event text is escaped too
    live = client.get("/admin/node/network?part=live").text
    assert "<html" not in live
    assert 'id="peers"' in live
    assert client.get("/admin/node/network?part=all").status_code == 422


def test_training_page_draws_loss_curves_as_server_rendered_svg(node_web: NodeWeb) -> None:
    for step in range(0, 50, 10):
        node_web.view.bus.publish("training_progress", step=step, loss=5 - step / 50)
    client = node_web.client()
    login(client, "admin")
    html = client.get("/admin/node/training").text
    polylines = re.findall(r'<polyline points="([^"]+)"', html)
    assert len(polylines) == 3  # train and validation per round, train per step
    assert [len(p.split()) for p in polylines] == [10, 10, 5]
    assert "latest 3.0000" in html  # round 10's training loss


def test_annotation_page_shows_progress_and_replication(node_web: NodeWeb) -> None:
    node_web.view.bus.publish("annotation_replicated", count=7, source="a" * 12)
    client = node_web.client()
    login(client, "admin")
    html = client.get("/admin/node/annotation").text
    assert "sentiment" in html
    assert '<span class="num" id="ann-replicated">7</span>' in html
    assert "0/4" in html
    assert client.get("/admin").text.count("/admin/node/") == 3  # linked from the overview


def test_without_a_node_the_app_keeps_its_database_health_and_has_no_dashboard(
    tmp_path: Path,
) -> None:
    store = CurationStore.open(
        f"sqlite:///{tmp_path / 'plain.db'}", NodeIdentity.generate(), password_hasher=FAST_HASHER
    )
    try:
        store.create_annotator("admin", PASSWORD, role="admin")
        client = TestClient(create_app(store, make_settings(tmp_path)))
        body = client.get("/api/health").json()
        assert body["status"] == "ok"
        assert "components" not in body
        assert client.get("/metrics").status_code == 404
        login(client, "admin")
        assert client.get("/admin/node/network").status_code == 404
        assert "/admin/node/" not in client.get("/admin").text
    finally:
        store.close()


def test_line_chart_scales_points_into_the_box_and_survives_flat_or_empty_data() -> None:
    c = line_chart([[0, 4.0], [5, 3.0], [10, 2.0]], width=100, height=50)
    xs = [float(p.split(",")[0]) for p in c["points"].split()]
    ys = [float(p.split(",")[1]) for p in c["points"].split()]
    assert xs == [8.0, 50.0, 92.0]
    assert ys == [8.0, 25.0, 42.0]  # SVG y grows downwards: a falling loss slopes down
    assert (c["y_min"], c["y_max"]) == (2.0, 4.0)
    flat = line_chart([[1, 2.0], [2, 2.0]])
    assert flat["n"] == 2
    assert flat["y_min"] < 2.0 < flat["y_max"]
    assert line_chart([])["n"] == 0
    assert line_chart([[1, float("nan")], [2, 1.0]])["n"] == 1


@pytest.mark.integration
def test_browser_dashboard_updates_live_from_server_sent_events(
    node_web: NodeWeb, browser: Any
) -> None:
    """A real Chromium on the network and training pages: events change what is shown.

    `browser` (tests/conftest.py) skips this when Chromium or playwright is missing."""
    import asyncio
    import threading
    import time

    import uvicorn
    from playwright.sync_api import expect

    from swarmlm.node.ops import close_event_streams

    server = uvicorn.Server(
        uvicorn.Config(node_web.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        node_web.view.bus.bind(loops[0])
        await server.serve()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    bus = node_web.view.bus
    try:
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))  # script errors
            page.on(
                "response",
                lambda r: (
                    errors.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico")
                    else None
                ),
            )
            page.goto(f"{url}/login")
            page.fill("#username", "admin")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/dashboard")

            page.goto(f"{url}/admin/node/network")
            expect(page.locator("#live-status")).to_have_text("live")
            assert page.locator("#rounds").inner_text().count("no round decided") == 1
            bus.publish("round_decided", round=13, latency_s=1.25, members=3, accepted=2,
                        val_loss=2.9, train_loss=3.0, reputation={"d" * 12: 0.5})  # fmt: skip
            page.wait_for_selector("#rounds td:text-is('13')", timeout=10_000)
            page.wait_for_selector("#reputation td:has-text('dddddddddddd')")
            assert "round_decided" in page.locator("#event-log li").first.inner_text()

            page.goto(f"{url}/admin/node/training")
            expect(page.locator("#live-status")).to_have_text("live")
            assert page.locator("svg.chart.line").count() == 2  # per-step curve not yet
            for step in (10, 20):
                bus.publish("training_progress", step=step, loss=4.0 - step / 100)
            expect(page.locator("svg.chart.line")).to_have_count(3)
            assert page.locator("#training-loss").inner_text() == "3.8000"
            assert errors == []
        finally:
            page.close()
    finally:
        loops[0].call_soon_threadsafe(close_event_streams, node_web.app)
        server.should_exit = True
        thread.join(10)


def test_network_page_warns_while_the_membership_tolerates_no_fault(node_web: NodeWeb) -> None:
    warning = "n = 3 members tolerate no faulty or crashed member (need n >= 4 for f = 1)"
    rounds = component("ok", False, members=3, faults_tolerated=0, warning=warning)
    node_web.view.health = lambda: health_report({"rounds": rounds})  # type: ignore[method-assign]
    client = node_web.client()
    login(client, "admin")
    for page in ("/admin/node/network", "/admin/node/network?part=live"):
        html = client.get(page).text
        assert '<p class="warning" id="rounds-warning">' in html
        assert f"{warning.replace('>', '&gt;')}</p>" in html
    rounds.pop("warning")
    assert 'class="warning"' not in client.get("/admin/node/network").text


def test_training_page_says_who_was_left_out_of_the_last_round_and_why(
    node_web: NodeWeb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round report's samples, weights and left_out (issue 19): a slow peer's smaller
    weight and a stale liar left out, with the reason."""
    last = {
        "round": 7,
        "samples": {"aaaaaaaaaaaa": 40, "bbbbbbbbbbbb": 4, "cccccccccccc": 40},
        "weights": {"aaaaaaaaaaaa": 0.476, "bbbbbbbbbbbb": 0.048},
        "left_out": {"cccccccccccc": "stale: repeats its own earlier update (cosine 1.0000)"},
    }
    training = node_web.view.training()
    monkeypatch.setattr(node_web.view, "training", lambda: {**training, "last_round": last})
    client = node_web.client()
    login(client, "admin")
    html = client.get("/admin/node/training").text
    assert "0.048" in html
    assert "stale: repeats its own earlier update" in html
    assert 'id="round-left-out"' in html
