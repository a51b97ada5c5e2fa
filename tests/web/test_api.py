"""The REST API end to end with httpx (FastAPI's TestClient) against a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from web_helpers import PASSWORD, Web, api_token

from swarmlm.curation.signing import verify_export_file


def test_openapi_schema_describes_the_public_endpoints(web: Web) -> None:
    paths = web.client().get("/openapi.json").json()["paths"]
    for path in (
        "/api/tasks",
        "/api/submit",
        "/api/stats",
        "/api/leaderboard",
        "/api/health",
        "/api/task-sets/{task_set_id}/import",
        "/api/task-sets/{task_set_id}/export",
    ):
        assert path in paths
    assert not any(p.startswith("/admin") for p in paths)


def test_script_client_creates_imports_annotates_and_exports_signed_results(
    web: Web, tmp_path: Path
) -> None:
    c = web.client()
    admin = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    r = c.post(
        "/api/task-sets",
        json={"name": "prefs", "label_schema": {"kind": "pairwise"}, "k": 2, "gold_share": 0.0},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    ts_id = r.json()["id"]
    r = c.post(
        f"/api/task-sets/{ts_id}/import",
        json={
            "tasks": [
                {"id": "p1", "content": "Greet me", "outputs": ["Hi!", "No."]},
                {"id": "p2", "content": "2+2?", "outputs": ["5", "4"]},
            ]
        },
        headers=admin,
    )
    assert r.json() == {"imported": 2}
    ls = [{"id": 7, "data": {"text": "Capital of France?", "a1": "Paris", "a2": "Rome"}}]
    r = c.post(
        f"/api/task-sets/{ts_id}/import",
        json={"format": "label_studio", "text": json.dumps(ls), "outputs_keys": ["a1", "a2"]},
        headers=admin,
    )
    assert r.json() == {"imported": 1}
    r = c.post(
        f"/api/task-sets/{ts_id}/import",
        json={"format": "jsonl", "text": '{"content": "x", "outputs": ["only one"]}'},
        headers=admin,
    )
    assert r.status_code == 422
    assert "needs 2 outputs" in r.json()["detail"]

    better = {"Hi!": "A", "5": "B", "Paris": "A"}
    for name in ("ann1", "ann2"):
        assert (
            c.post("/api/register", json={"username": name, "password": PASSWORD}).status_code
            == 201
        )
        auth = {"authorization": f"Bearer {api_token(c, name)}"}
        done = 0
        while True:
            task = c.get(f"/api/tasks?task_set_id={ts_id}", headers=auth).json()["task"]
            if task is None:
                break
            assert task["schema"] == {"kind": "pairwise"}
            r = c.post(
                "/api/submit",
                json={
                    "task_id": task["task_id"],
                    "value": better[task["outputs"][0]],
                    "time_spent_ms": 900,
                },
                headers=auth,
            )
            assert r.status_code == 200, r.text
            assert len(r.json()["signature"]) == 128
            done += 1
        assert done == 3
    stats = c.get("/api/stats", headers=admin).json()
    assert stats["annotations"] == 6
    prefs_progress = next(p for p in stats["task_set_progress"] if p["id"] == ts_id)
    assert prefs_progress["finalised"] == 3

    r = c.get(f"/api/task-sets/{ts_id}/export?kind=preferences", headers=admin)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    prefs = [json.loads(x) for x in r.text.splitlines()]
    assert {"prompt": "2+2?", "chosen": "4", "rejected": "5"} in prefs
    assert {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"} in prefs
    r = c.get(f"/api/task-sets/{ts_id}/export?kind=annotations", headers=admin)
    out = tmp_path / "ann.jsonl"
    out.write_text(r.text)
    report = verify_export_file(out)
    assert report.ok
    assert report.valid == 6


def test_leaderboard_and_me_reflect_points(web: Web) -> None:
    c = web.client()
    c.post("/api/register", json={"username": "gina", "password": PASSWORD})
    auth = {"authorization": f"Bearer {api_token(c, 'gina')}"}
    before = {a["username"]: a["points"] for a in c.get("/api/leaderboard", headers=auth).json()}
    assert before["gina"] == 0
    task = c.get(f"/api/tasks?task_set_id={web.task_set_id}", headers=auth).json()["task"]
    c.post("/api/submit", json={"task_id": task["task_id"], "value": "negative"}, headers=auth)
    after = {a["username"]: a["points"] for a in c.get("/api/leaderboard", headers=auth).json()}
    assert after["gina"] == 1
    assert c.get("/api/me", headers=auth).json()["points"] == 1


def test_store_errors_map_to_clear_http_statuses(web: Web) -> None:
    c = web.client()
    c.post("/api/register", json={"username": "hank", "password": PASSWORD})
    auth = {"authorization": f"Bearer {api_token(c, 'hank')}"}
    r = c.get("/api/tasks?task_set_id=999", headers=auth)
    assert r.status_code == 404
    assert "task set 999 does not exist" in r.json()["detail"]
    task = c.get(f"/api/tasks?task_set_id={web.task_set_id}", headers=auth).json()["task"]
    r = c.post("/api/submit", json={"task_id": task["task_id"], "value": "great"}, headers=auth)
    assert r.status_code == 422
    assert "value must be one of" in r.json()["detail"]
    assert c.post("/api/skip", json={"task_id": task["task_id"]}, headers=auth).status_code == 200
    r = c.post("/api/submit", json={"task_id": task["task_id"], "value": "positive"}, headers=auth)
    assert r.status_code == 409
    assert "skipped" in r.json()["detail"]
    r = c.post("/api/register", json={"username": "hank", "password": PASSWORD})
    assert r.status_code == 409
