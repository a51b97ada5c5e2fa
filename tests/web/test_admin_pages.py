"""Data manager, task view and review through HTTP (TestClient) on a real SQLite store."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute
from web_helpers import PASSWORD, Web, api_token, form_token, login, register

from swarmlm.curation.store import TaskInput
from swarmlm.web import admin, api, data_manager, label_config, review


def _annotate_all(web: Web, users: list[str], answers: dict[str, str]) -> None:
    """Each user answers every task they are offered: their entry in ``answers``."""
    for u in users:
        info = web.store.create_annotator(u, PASSWORD)
        while (lt := web.store.next_task(info.id, web.task_set_id)) is not None:
            web.store.submit(info.id, lt.task_id, answers[u], 500)


def test_every_admin_and_review_route_refuses_annotators(web: Web) -> None:
    c = web.client()
    register(c, "annie")
    csrf = form_token(c.get("/dashboard").text)
    token = api_token(c, "annie")
    routers = [admin.router, api.router, data_manager.pages, data_manager.api, label_config.pages]
    guarded = [
        r
        for r in [x for router in (*routers, review.pages, review.api) for x in router.routes]
        if isinstance(r, APIRoute)
        and any(
            name in getattr(d.call, "__name__", "")
            for d in r.dependant.dependencies
            for name in ("admin", "reviewer")
        )
    ]
    paths = {r.path for r in guarded}
    for expected in (
        "/admin/task-sets/{task_set_id}/tasks",
        "/admin/task-sets/{task_set_id}/tasks/bulk",
        "/admin/tasks/{task_id}",
        "/review",
        "/review/{task_set_id}",
        "/api/task-sets/{task_set_id}/tasks",
        "/api/task-sets/{task_set_id}/tasks/{task_id}",
        "/api/task-sets/{task_set_id}/tasks/bulk",
        "/api/reviews",
        "/admin/task-sets/{task_set_id}/label-config",
        "/api/task-sets/{task_set_id}/label-config",
    ):
        assert expected in paths
    for route in guarded:
        path = (
            route.path.replace("{task_set_id}", str(web.task_set_id))
            .replace("{task_id}", "1")
            .replace("{annotator_id}", "1")
            .replace("{page}", "network")
        )
        for method in route.methods:
            r1 = c.request(method, path, data={"csrf_token": csrf}, headers={"x-csrf-token": csrf})
            r2 = c.request(method, path, headers={"authorization": f"Bearer {token}"})
            assert r1.status_code in (403, 404), (method, path, r1.status_code)
            assert r2.status_code in (403, 404), (method, path, r2.status_code)
            if "node" not in path:  # node pages answer 404 without a node, before the role
                assert (r1.status_code, r2.status_code) == (403, 403), (method, path)


def test_data_manager_filters_pages_and_bulk_actions_from_forms(web: Web) -> None:
    web.store.add_tasks(
        web.task_set_id,
        [TaskInput(content=f"<b>extra</b> & {i}", external_id=f"x{i}") for i in range(60)],
    )
    _annotate_all(web, ["ann1", "ann2"], {"ann1": "positive", "ann2": "positive"})
    c = web.client()
    login(c, "admin")
    base = f"/admin/task-sets/{web.task_set_id}/tasks"
    page = c.get(base)
    assert page.status_code == 200
    assert "66 tasks match" in page.text
    assert "&lt;b&gt;extra&lt;/b&gt; &amp; 0" in page.text  # escaped
    assert 'rel="next"' in page.text
    p2 = c.get(base, params={"page": 2, "per_page": 25, "sort": "-id"})
    ids = re.findall(r'name="ids" value="(\d+)"', p2.text)
    assert len(ids) == 25
    assert [int(i) for i in ids] == sorted((int(i) for i in ids), reverse=True)
    found = c.get(base, params={"search": "review number 3"})
    assert "1 tasks match" in found.text
    bad = c.get(base, params={"confidence_min": "lots"})
    assert bad.status_code == 422
    # bulk: mark every finalised task with consensus "positive" as gold ("all matching")
    csrf = form_token(page.text)
    r = c.post(
        f"{base}/bulk",
        data={
            "csrf_token": csrf,
            "action": "mark_gold",
            "scope": "all",
            "status": "finalised",
            "label": "positive",
        },
    )
    assert r.status_code == 200
    assert "mark_gold: 66 tasks" in r.text
    assert "gold only" in r.text
    gold = c.get(base, params={"gold": "yes"})
    assert "66 tasks match" in gold.text
    # ticked rows only; the CSRF token is required
    one = re.findall(r'name="ids" value="(\d+)"', gold.text)[:2]
    assert c.post(f"{base}/bulk", data={"action": "delete", "ids": one}).status_code == 403
    r = c.post(f"{base}/bulk", data={"csrf_token": csrf, "action": "delete", "ids": one})
    assert "delete: 2 tasks" in r.text
    assert "64 tasks match" in c.get(base).text


def test_task_view_and_review_round_trip_reach_the_annotator(web: Web) -> None:
    _annotate_all(web, ["ann1", "ann2"], {"ann1": "positive", "ann2": "negative"})
    web.store.create_annotator("rev", PASSWORD, role="reviewer")
    c = web.client()
    login(c, "rev")
    assert c.get("/admin").status_code == 403  # a reviewer is not an admin
    page = c.get(f"/review/{web.task_set_id}")
    assert page.status_code == 200
    who = re.search(r"<strong>(ann\d)</strong> answered", page.text)
    assert who
    annotation_id = re.search(r'name="annotation_id" value="(\d+)"', page.text)
    assert annotation_id
    r = c.post(
        f"/review/{web.task_set_id}",
        data={
            "csrf_token": form_token(page.text),
            "annotation_id": annotation_id.group(1),
            "verdict": "corrected",
            "corrected": "neutral",
            "comment": "<i>mixed</i> review",
        },
    )
    assert r.status_code == 200
    assert "Saved: corrected" in r.text
    # the admin sees it in the task view, the annotator on the dashboard
    admin = web.client()
    login(admin, "admin")
    token = api_token(admin, "admin")
    auth = {"authorization": f"Bearer {token}"}
    rows = admin.get(
        f"/api/task-sets/{web.task_set_id}/tasks", params={"label": "neutral"}, headers=auth
    ).json()
    assert rows["total"] == 1
    tid = rows["tasks"][0]["id"]
    detail = admin.get(f"/api/task-sets/{web.task_set_id}/tasks/{tid}", headers=auth).json()
    assert detail["consensus"] == "neutral"
    assert detail["confidence"] == 1.0
    assert {a["annotator"] for a in detail["annotations"]} == {"ann1", "ann2"}
    assert "review: corrected" in [h["event"] for h in detail["history"]]
    view = admin.get(f"/admin/tasks/{tid}")
    assert view.status_code == 200
    assert "Posterior of the consensus" in view.text
    ann = web.client()
    login(ann, who.group(1))
    dash = ann.get("/dashboard").text
    assert "corrected</strong> by rev" in dash
    assert "&lt;i&gt;mixed&lt;/i&gt; review" in dash
    # the review API: a reviewer can reject through it with a bearer token, not twice
    rev_auth = {"authorization": f"Bearer {api_token(c, 'rev')}"}
    other = next(a for a in detail["annotations"] if a["review"] is None)
    body = {"annotation_id": other["id"], "verdict": "rejected", "comment": "no"}
    assert c.post("/api/reviews", json=body, headers=rev_auth).status_code == 201
    assert c.post("/api/reviews", json=body, headers=rev_auth).status_code == 404
    assert (
        c.post("/api/reviews", json={**body, "verdict": "maybe"}, headers=rev_auth).status_code
        == 422
    )


def test_bulk_api_and_filters_validate_input(web: Web) -> None:
    c = web.client()
    auth = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    url = f"/api/task-sets/{web.task_set_id}/tasks"
    assert c.get(url, params={"sort": "content"}, headers=auth).status_code == 422
    assert c.get(url, params={"status": "lost"}, headers=auth).status_code == 422
    assert c.get(url, params={"agreement_min": 2}, headers=auth).status_code == 422
    assert c.get("/api/task-sets/999/tasks", headers=auth).status_code == 404
    ids = [t["id"] for t in c.get(url, headers=auth).json()["tasks"]]
    r = c.post(
        f"{url}/bulk",
        json={"action": "raise_redundancy", "task_ids": ids[:3], "amount": 2},
        headers=auth,
    )
    assert r.json() == {"changed": 3}
    assert [t["needed"] for t in c.get(url, headers=auth).json()["tasks"][:4]] == [4, 4, 4, 2]
    r = c.post(f"{url}/bulk", json={"action": "explode", "task_ids": ids}, headers=auth)
    assert r.status_code == 422


def test_exports_carry_consensus_labels_in_every_format(web: Web) -> None:
    import csv
    import io
    import json

    _annotate_all(web, ["ann1", "ann2"], {"ann1": "positive", "ann2": "positive"})
    c = web.client()
    auth = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    url = f"/api/task-sets/{web.task_set_id}/export"
    r = c.get(url, params={"kind": "csv"}, headers=auth)
    assert r.headers["content-type"].startswith("text/csv")
    assert 'sentiment-csv.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 6
    assert {row["consensus"] for row in rows} == {"positive"}
    assert rows[0]["annotations"] == "ann1=positive; ann2=positive"
    assert float(rows[0]["confidence"]) > 0.5
    ls = c.get(url, params={"kind": "label_studio"}, headers=auth).json()
    assert len(ls) == 6
    assert ls[0]["data"] == {"text": "review number 0"}
    assert [a["result"][0]["value"] for a in ls[0]["annotations"]] == [
        {"choices": ["positive"]}
    ] * 2
    assert ls[0]["predictions"][0]["result"][0]["value"] == {"choices": ["positive"]}
    lines = c.get(url, params={"kind": "consensus"}, headers=auth).text.splitlines()
    assert {json.loads(x)["consensus"] for x in lines} == {"positive"}
    # a Label Studio export imports back (the annotations are not: nobody here signed them)
    ts = web.store.create_task_set(
        "again", {"kind": "single_choice", "choices": ["positive", "negative"]}, k=1
    )
    r = c.post(
        f"/api/task-sets/{ts.id}/import",
        json={"format": "label_studio", "text": json.dumps(ls)},
        headers=auth,
    )
    assert r.json() == {"imported": 6}
    r = c.get(f"/api/task-sets/{ts.id}/export", params={"kind": "preferences"}, headers=auth)
    assert r.status_code == 422  # refused before any byte of a body


def test_csv_import_reads_label_studio_style_columns(web: Web) -> None:
    c = web.client()
    auth = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    ts = web.store.create_task_set("pairs", {"kind": "pairwise"}, k=1, gold_share=0.0)
    text = 'id,text,output_1,output_2,gold\np1,"Greet me, please",Hi!,No.,A\np2,2+2?,5,4,\n'
    r = c.post(f"/api/task-sets/{ts.id}/import", json={"format": "csv", "text": text}, headers=auth)
    assert r.json() == {"imported": 2}
    tasks = web.store.list_tasks(ts.id)
    assert [(t.external_id, t.content, t.outputs, t.gold) for t in tasks] == [
        ("p1", "Greet me, please", ["Hi!", "No."], "A"),
        ("p2", "2+2?", ["5", "4"], None),
    ]
    bad = "id,text,output_1\nx1,hello,only one\n"
    r = c.post(f"/api/task-sets/{ts.id}/import", json={"format": "csv", "text": bad}, headers=auth)
    assert r.status_code == 422
    assert "needs 2 outputs" in r.json()["detail"]


def test_annotator_admin_shows_activity_changes_roles_and_resets_passwords(web: Web) -> None:
    _annotate_all(web, ["ann1", "ann2"], {"ann1": "positive", "ann2": "negative"})
    ann1 = web.store.find_annotator("ann1")
    victim = web.client()
    login(victim, "ann1")
    victim_token = api_token(victim, "ann1")
    c = web.client()
    login(c, "admin")
    page = c.get(f"/admin/annotators/{ann1.id}")
    assert page.status_code == 200
    assert re.search(r'id="total-annotations">6<', page.text)
    assert "reputation after each checked answer" in page.text
    assert "<polyline" in page.text
    csrf = form_token(page.text)
    r = c.post(
        f"/admin/annotators/{ann1.id}",
        data={"csrf_token": csrf, "action": "make_reviewer", "where": "detail"},
    )
    assert r.url.path == f"/admin/annotators/{ann1.id}"
    assert web.store.find_annotator("ann1").role == "reviewer"
    r = c.post(
        f"/admin/annotators/{ann1.id}", data={"csrf_token": csrf, "action": "reset_password"}
    )
    new_password = re.search(r'id="new-password" class="answer">([^<]+)<', r.text)
    assert new_password
    assert r.headers.get("location") is None  # shown in the response, never in a URL
    # the old credentials are gone at once, the new password works
    assert victim.get("/dashboard", follow_redirects=False).status_code == 303
    assert c.get("/api/me", headers={"authorization": f"Bearer {victim_token}"}).status_code == 401
    assert c.post("/api/login", json={"username": "ann1", "password": PASSWORD}).status_code == 401
    ok = c.post("/api/login", json={"username": "ann1", "password": new_password.group(1)})
    assert ok.status_code == 200
    # an admin cannot reset or demote themselves
    me = web.store.find_annotator("admin")
    r = c.post(f"/admin/annotators/{me.id}", data={"csrf_token": csrf, "action": "reset_password"})
    assert r.status_code == 400


def test_import_preview_is_a_dry_run_and_instructions_reach_annotators(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    page = c.get(f"/admin/task-sets/{web.task_set_id}")
    csrf = form_token(page.text)
    url = f"/admin/task-sets/{web.task_set_id}/import"
    csv_text = "id,text\nn1,first new review\nn2,second <b>new</b> review\n"
    files = {"file": ("more.csv", csv_text.encode(), "text/csv")}
    r = c.post(url, data={"csrf_token": csrf, "mode": "preview"}, files=files)
    assert r.status_code == 200
    assert "2 tasks would be imported, nothing was saved" in r.text
    assert "second &lt;b&gt;new&lt;/b&gt; review" in r.text
    assert len(web.store.list_tasks(web.task_set_id)) == 6
    dup = {"file": ("dup.csv", b"id,text\nn1,a\nn1,b\n", "text/csv")}
    r = c.post(url, data={"csrf_token": csrf, "mode": "preview"}, files=dup)
    assert r.status_code == 422
    assert "duplicate external id" in r.text
    r = c.post(url, data={"csrf_token": csrf, "mode": "import"}, files=files)
    assert "Imported 2 tasks" in r.text
    assert len(web.store.list_tasks(web.task_set_id)) == 8
    # instructions: saved with the CSRF token only, shown escaped on the annotation page
    settings = f"/admin/task-sets/{web.task_set_id}/settings"
    text = "Judge the <i>tone</i>, not the grammar."
    assert c.post(settings, data={"description": text, "active": "on"}).status_code == 403
    r = c.post(settings, data={"csrf_token": csrf, "description": text, "active": "on"})
    assert "Saved." in r.text
    assert "annotator-preview" in r.text
    annotator = web.client()
    register(annotator, "newbie")
    shown = annotator.get(f"/annotate/{web.task_set_id}").text
    assert "Judge the &lt;i&gt;tone&lt;/i&gt;, not the grammar." in shown


def test_admin_dashboard_charts_throughput_agreement_and_queue(web: Web) -> None:
    _annotate_all(web, ["ann1", "ann2"], {"ann1": "positive", "ann2": "positive"})
    c = web.client()
    login(c, "admin")
    html = c.get("/admin").text
    for label in ("annotations per day", "mean agreement of tasks finalised that day",
                  "open tasks at the end of the day"):  # fmt: skip
        assert f'aria-label="{label}"' in html
    assert html.count("<polyline") == 3


def test_status_messages_in_links_cannot_put_words_on_admin_pages(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    spoof = "Your session expired: log in at evil.example"
    page = c.get(f"/admin/task-sets/{web.task_set_id}/tasks", params={"done": spoof})
    assert "evil.example" not in page.text
    ok = c.get(f"/admin/task-sets/{web.task_set_id}/tasks", params={"done": "delete: 2 tasks"})
    assert "Done: delete: 2 tasks." in ok.text
    assert "evil.example" not in c.get(f"/review/{web.task_set_id}", params={"done": spoof}).text
