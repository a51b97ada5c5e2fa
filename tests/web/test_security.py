"""Security properties of the web app: CSRF, roles, cookies, rate and size limits, escaping."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from web_helpers import PASSWORD, Web, api_token, form_token, login, register

from swarmlm.curation.store import TaskInput
from swarmlm.web import admin as admin_pages
from swarmlm.web import api


def test_form_posts_without_the_csrf_token_are_refused(web: Web) -> None:
    c = web.client()
    # anonymous forms: no token / wrong token
    r = c.post("/register", data={"username": "mallory", "password": PASSWORD})
    assert r.status_code == 403
    assert "CSRF" in r.text
    c.get("/register")
    r = c.post(
        "/register", data={"username": "mallory", "password": PASSWORD, "csrf_token": "forged"}
    )
    assert r.status_code == 403
    register(c, "alice")
    page = c.get(f"/annotate/{web.task_set_id}").text
    task_id = re.search(r'name="task_id" value="(\d+)"', page).group(1)  # type: ignore[union-attr]
    for data in (
        {"task_id": task_id, "value": "positive", "action": "submit"},
        {"task_id": task_id, "value": "positive", "action": "submit", "csrf_token": "forged"},
    ):
        r = c.post(f"/annotate/{web.task_set_id}", data=data)
        assert r.status_code == 403
    assert web.store.count_annotations() == 0
    r = c.post("/logout", data={})
    assert r.status_code == 403


def test_annotator_cannot_reach_any_admin_route(web: Web) -> None:
    c = web.client()
    register(c, "annie")
    csrf = form_token(c.get("/dashboard").text)
    token = api_token(c, "annie")
    admin_routes = [
        r
        for r in [*admin_pages.router.routes, *api.router.routes]
        if isinstance(r, APIRoute)
        and (
            r.path.startswith("/admin")
            or any("admin" in getattr(d.call, "__name__", "") for d in r.dependant.dependencies)
        )
    ]
    assert len(admin_routes) >= 12
    for route in admin_routes:
        path = route.path.replace("{task_set_id}", str(web.task_set_id)).replace(
            "{annotator_id}", "1"
        )
        for method in route.methods:
            # with the session cookie (and a valid CSRF token) and with a bearer token
            r1 = c.request(method, path, data={"csrf_token": csrf}, headers={"x-csrf-token": csrf})
            r2 = c.request(method, path, headers={"authorization": f"Bearer {token}"})
            assert r1.status_code == 403, (method, path, r1.status_code)
            assert r2.status_code == 403, (method, path, r2.status_code)
    assert web.store.find_annotator("admin").role == "admin"


def test_anonymous_visitors_are_sent_to_login_and_api_says_401(web: Web) -> None:
    c = web.client()
    r = c.get("/dashboard", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/login"
    assert c.get(f"/api/tasks?task_set_id={web.task_set_id}").status_code == 401
    r = c.get("/api/stats", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    assert "invalid or revoked" in r.json()["detail"]
    assert c.get("/api/health").status_code == 200


def test_session_cookie_is_httponly_and_samesite(web: Web) -> None:
    c = web.client()
    token = form_token(c.get("/register").text)
    r = c.post(
        "/register",
        data={"username": "carol", "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "session" in v)
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain HTTP here; set when served over TLS
    tls = TestClient(web.app, base_url="https://testserver")
    token = form_token(tls.get("/register").text)
    r = tls.post(
        "/register",
        data={"username": "dave", "password": PASSWORD, "csrf_token": token},
        follow_redirects=False,
    )
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "session" in v)
    assert "Secure" in cookie


def test_api_writes_with_a_session_cookie_need_the_csrf_header(web: Web) -> None:
    c = web.client()
    register(c, "erin")
    csrf = form_token(c.get("/dashboard").text)
    task = c.get(f"/api/tasks?task_set_id={web.task_set_id}").json()["task"]
    body = {"task_id": task["task_id"], "value": "neutral"}
    assert c.post("/api/submit", json=body).status_code == 403
    r = c.post("/api/submit", json=body, headers={"x-csrf-token": csrf})
    assert r.status_code == 200, r.text


def test_login_attempts_are_rate_limited(make_web: Callable[..., Web]) -> None:
    web = make_web(login_per_minute=3)
    c = web.client()
    codes = []
    for _ in range(5):
        token = form_token(c.get("/login").text)
        r = c.post(
            "/login", data={"username": "admin", "password": "wrong!!!", "csrf_token": token}
        )
        codes.append(r.status_code)
    assert codes[:3] == [401, 401, 401]
    assert codes[3:] == [429, 429]
    r = c.post("/api/login", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 429  # even the right password waits out the limit


def test_submissions_are_rate_limited_per_annotator(make_web: Callable[..., Web]) -> None:
    web = make_web(submit_per_second=0.01, submit_burst=2)
    web.store.add_tasks(web.task_set_id, [TaskInput(content=f"more {i}") for i in range(5)])
    c = web.client()
    register(c, "speedy")
    auth = {"authorization": f"Bearer {api_token(c, 'speedy')}"}
    codes = []
    for _ in range(4):
        task = c.get(f"/api/tasks?task_set_id={web.task_set_id}", headers=auth).json()["task"]
        r = c.post(
            "/api/submit", json={"task_id": task["task_id"], "value": "positive"}, headers=auth
        )
        codes.append(r.status_code)
    assert codes == [200, 200, 429, 429]
    assert "retry-after" in r.headers


def test_oversized_bodies_are_refused_before_processing(make_web: Callable[..., Web]) -> None:
    web = make_web(max_body_bytes=2048)
    c = web.client()
    auth = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    r = c.post("/api/submit", content=b"{" + b" " * 5000 + b"}", headers=auth)
    assert r.status_code == 413
    # imports have their own (larger) limit
    lines = "\n".join(json.dumps({"content": f"task {i}"}) for i in range(100))
    r = c.post(
        f"/api/task-sets/{web.task_set_id}/import",
        json={"format": "jsonl", "text": lines},
        headers=auth,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"imported": 100}


def test_script_in_task_content_is_escaped_and_csp_blocks_inline_scripts(web: Web) -> None:
    payload = '<script>document.title="pwned"</script><img src=x onerror="alert(1)">'
    ts = web.store.create_task_set("xss", {"kind": "pairwise"}, k=1, gold_share=0.0)
    web.store.add_tasks(ts.id, [TaskInput(content={"prompt": payload}, outputs=[payload, payload])])
    c = web.client()
    register(c, "victim")
    r = c.get(f"/annotate/{ts.id}")
    assert "<script>document" not in r.text
    assert "<img src=x" not in r.text
    assert "&lt;script&gt;" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    # the only script the page loads is our static file
    assert re.findall(r"<script[^>]*>", r.text) == ['<script src="/static/app.js" defer>']


def test_disabled_annotator_loses_session_and_tokens(web: Web) -> None:
    c = web.client()
    register(c, "frank")
    token = api_token(c, "frank")
    frank = web.store.find_annotator("frank")
    admin = web.client()
    login(admin, "admin")
    csrf = form_token(admin.get("/admin/annotators").text)
    r = admin.post(f"/admin/annotators/{frank.id}", data={"action": "disable", "csrf_token": csrf})
    assert r.status_code == 200
    assert c.get("/dashboard", follow_redirects=False).status_code == 303
    assert c.get("/api/me", headers={"authorization": f"Bearer {token}"}).status_code == 401
    r = c.post("/api/login", json={"username": "frank", "password": PASSWORD})
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"task_id": 1}, "value"),
        ({"task_id": 0, "value": "x"}, "task_id"),
        ({"task_id": 1, "value": "x", "time_spent_ms": -5}, "time_spent_ms"),
        ({"task_id": 1, "value": "x", "extra": 1}, "extra"),
    ],
)
def test_invalid_api_bodies_are_rejected_naming_the_field(
    web: Web, body: dict[str, object], fragment: str
) -> None:
    c = web.client()
    auth = {"authorization": f"Bearer {api_token(c, 'admin')}"}
    r = c.post("/api/submit", json=body, headers=auth)
    assert r.status_code == 422
    assert fragment in str(r.json()["detail"])
