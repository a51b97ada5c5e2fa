"""Server-rendered pages driven through forms (the browser tests cover the JavaScript)."""

from __future__ import annotations

import io
import json
import re

import pytest
from fastapi.testclient import TestClient
from web_helpers import Web, form_token, login, register

from swarmlm.curation.store import TaskInput


def _annotate_form(c: TestClient, ts_id: int) -> tuple[str, str] | None:
    page = c.get(f"/annotate/{ts_id}").text
    m = re.search(r'name="task_id" value="(\d+)"', page)
    return None if m is None else (m.group(1), form_token(page))


def test_annotator_registers_annotates_and_climbs_the_leaderboard(web: Web) -> None:
    c = web.client()
    register(c, "ivy")
    assert "sentiment" in c.get("/dashboard").text
    for _ in range(3):
        found = _annotate_form(c, web.task_set_id)
        assert found is not None
        task_id, csrf = found
        r = c.post(
            f"/annotate/{web.task_set_id}",
            data={
                "csrf_token": csrf,
                "task_id": task_id,
                "value": "positive",
                "action": "submit",
                "time_spent_ms": "1500",
            },
        )
        assert "Saved (+1 points)" in r.text
    board = c.get("/leaderboard").text
    row = re.search(r'<td class="name">ivy</td>\s*<td class="points">(\d+)</td>', board)
    assert row is not None
    assert row.group(1) == "3"
    dash = c.get("/dashboard").text
    assert 'id="my-points">3<' in dash


def test_skip_form_requeues_the_task_for_others(web: Web) -> None:
    c = web.client()
    register(c, "jack")
    found = _annotate_form(c, web.task_set_id)
    assert found is not None
    task_id, csrf = found
    r = c.post(
        f"/annotate/{web.task_set_id}",
        data={"csrf_token": csrf, "task_id": task_id, "action": "skip"},
    )
    assert "Skipped." in r.text
    assert f'name="task_id" value="{task_id}"' not in r.text
    other = web.client()
    register(other, "kate")
    got = _annotate_form(other, web.task_set_id)
    assert got is not None
    assert got[0] == task_id


@pytest.mark.parametrize(
    ("schema", "outputs", "fields", "stored"),
    [
        ({"kind": "rating", "min": 1, "max": 5}, None, {"value": "4"}, 4),
        (
            {"kind": "multiple_choice", "choices": ["a", "b", "c"]},
            None,
            {"value": ["c", "a"]},
            ["a", "c"],
        ),
        ({"kind": "ranking", "k": 3}, ["x", "y", "z"], {"value": "3,1,2"}, [2, 0, 1]),
        ({"kind": "free_text"}, None, {"value": "a summary"}, "a summary"),
        ({"kind": "pairwise"}, ["l", "r"], {"value": "both_bad"}, "both_bad"),
    ],
)
def test_each_schema_form_posts_its_value(
    web: Web,
    schema: dict[str, object],
    outputs: list[str] | None,
    fields: dict[str, object],
    stored: object,
) -> None:
    ts = web.store.create_task_set(f"s-{schema['kind']}", schema, k=1, gold_share=0.0)
    web.store.add_tasks(ts.id, [TaskInput(content="prompt", outputs=outputs)])
    c = web.client()
    register(c, "lena")
    found = _annotate_form(c, ts.id)
    assert found is not None
    task_id, csrf = found
    r = c.post(
        f"/annotate/{ts.id}",
        data={"csrf_token": csrf, "task_id": task_id, "action": "submit", **fields},
    )
    assert r.status_code == 200, r.text
    ((_, ann),) = web.store.annotations(ts.id)
    assert ann.value == stored


def test_invalid_form_value_shows_the_error_and_keeps_the_task(web: Web) -> None:
    c = web.client()
    register(c, "mia")
    found = _annotate_form(c, web.task_set_id)
    assert found is not None
    task_id, csrf = found
    r = c.post(
        f"/annotate/{web.task_set_id}",
        data={"csrf_token": csrf, "task_id": task_id, "action": "submit"},
    )
    assert r.status_code == 422
    assert "choose a label" in r.text
    assert f'name="task_id" value="{task_id}"' in r.text


def test_admin_creates_a_task_set_imports_a_file_and_sees_progress(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    csrf = form_token(c.get("/admin/task-sets/new").text)
    r = c.post(
        "/admin/task-sets",
        data={
            "name": "topics",
            "kind": "single_choice",
            "choices": "news, sport",
            "k": "1",
            "csrf_token": csrf,
        },
    )
    assert r.status_code == 200
    ts_id = int(r.url.path.rsplit("/", 1)[1])
    jsonl = "\n".join(json.dumps({"content": f"headline {i}"}) for i in range(4)).encode()
    r = c.post(
        f"/admin/task-sets/{ts_id}/import",
        data={"csrf_token": csrf, "fmt": "auto"},
        files={"file": ("tasks.jsonl", io.BytesIO(jsonl), "application/jsonl")},
    )
    assert "Imported 4 tasks." in r.text
    r = c.post(
        f"/admin/task-sets/{ts_id}/import",
        data={"csrf_token": csrf, "fmt": "jsonl"},
        files={"file": ("bad.jsonl", io.BytesIO(b'{"content": "ok"}\n{oops'), "text/plain")},
    )
    assert r.status_code == 422
    assert "bad.jsonl line 2: invalid JSON" in r.text
    overview = c.get("/admin").text
    assert "topics" in overview
    assert "<svg" in overview
    assert c.get("/admin/health").status_code == 200
    assert "0/4" in overview or "0/4" in c.get(f"/admin/task-sets/{ts_id}").text


def test_admin_cannot_disable_themselves(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    csrf = form_token(c.get("/admin/annotators").text)
    me = web.store.find_annotator("admin")
    r = c.post(f"/admin/annotators/{me.id}", data={"action": "disable", "csrf_token": csrf})
    assert r.status_code == 400
    assert not web.store.find_annotator("admin").disabled
