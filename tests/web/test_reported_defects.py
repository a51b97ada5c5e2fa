"""Defects reported from a browser and independent tools (issue 23), one test each.

The browser-only ones (sub-navigation contrast, rating shortcuts) are in
``test_admin_browser.py``.
"""

from __future__ import annotations

import json
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fastapi.testclient import TestClient
from web_helpers import FAST_HASHER, PASSWORD, Web, api_token, form_token, login, register

from swarmlm.curation.db import default_db_url
from swarmlm.curation.replica import decode_record
from swarmlm.curation.store import CurationStore, TaskInput
from swarmlm.p2p.identity import NodeIdentity


def _admin(c: TestClient) -> dict[str, str]:
    return {"authorization": f"Bearer {api_token(c, 'admin')}"}


def _strict_json(line: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


# 3 ---------------------------------------------------------------------------------------
def test_an_empty_multiple_choice_answer_is_refused_and_earns_nothing(web: Web) -> None:
    ts = web.store.create_task_set(
        "topics", {"kind": "multiple_choice", "choices": ["a", "b"]}, k=1, gold_share=0.0
    )
    web.store.add_tasks(ts.id, [TaskInput(content="pick topics")])
    c = web.client()
    register(c, "eve")
    auth = {"authorization": f"Bearer {api_token(c, 'eve')}"}
    task = c.get(f"/api/tasks?task_set_id={ts.id}", headers=auth).json()["task"]
    r = c.post("/api/submit", json={"task_id": task["task_id"], "value": []}, headers=auth)
    assert r.status_code == 422, r.text
    # the form path (no box ticked) is refused the same way
    page = c.get(f"/annotate/{ts.id}")
    r = c.post(
        f"/annotate/{ts.id}",
        data={"csrf_token": form_token(page.text), "task_id": task["task_id"], "action": "submit"},
    )
    assert r.status_code == 422
    me = c.get("/api/me", headers=auth).json()
    assert me["points"] == 0
    assert web.store.count_annotations(ts.id) == 0


# 4 ---------------------------------------------------------------------------------------
def test_tasks_are_served_oldest_first_within_a_priority(web: Web) -> None:
    ts = web.store.create_task_set(
        "ordered", {"kind": "single_choice", "choices": ["x", "y"]}, k=1, gold_share=0.0
    )
    web.store.add_tasks(ts.id, [TaskInput(content=f"t{i}", external_id=f"t{i}") for i in range(4)])
    c = web.client()
    register(c, "ordy")
    auth = {"authorization": f"Bearer {api_token(c, 'ordy')}"}
    served = []
    for _ in range(4):
        task = c.get(f"/api/tasks?task_set_id={ts.id}", headers=auth).json()["task"]
        served.append(task["external_id"])
        c.post("/api/submit", json={"task_id": task["task_id"], "value": "x"}, headers=auth)
    assert served == ["t0", "t1", "t2", "t3"]


# 5 ---------------------------------------------------------------------------------------
def test_nan_and_infinity_are_refused_on_import_so_exports_stay_json(web: Web) -> None:
    c = web.client()
    admin = _admin(c)
    url = f"/api/task-sets/{web.task_set_id}/import"
    for text in ('{"content": {"score": NaN}}', '{"content": "x", "meta": {"w": Infinity}}'):
        r = c.post(url, json={"format": "jsonl", "text": text}, headers=admin)
        assert r.status_code == 422, r.text
        assert "line 1" in r.json()["detail"]
    # a JSON body carrying NaN (Python's json accepts it) is refused too
    raw = b'{"tasks": [{"content": {"score": NaN}}]}'
    r = c.post(url, content=raw, headers={**admin, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    ls = json.dumps([{"id": 1, "data": {"text": "t", "p": 1.5}}]).replace("1.5", "-Infinity")
    r = c.post(url, json={"format": "label_studio", "text": ls}, headers=admin)
    assert r.status_code == 422, r.text
    export = c.get(f"/api/task-sets/{web.task_set_id}/export?kind=consensus", headers=admin)
    for line in export.text.splitlines():
        _strict_json(line)
    assert len(export.text.splitlines()) == 6  # only the fixture's tasks


# 6 ---------------------------------------------------------------------------------------
def test_a_chunked_body_over_the_limit_gets_413(make_web: Callable[..., Web]) -> None:
    web = make_web(max_body_bytes=2048)
    c = web.client()
    admin = _admin(c)

    def chunks() -> Iterator[bytes]:
        yield b'{"task_id": 1, "value": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = c.post(
        "/api/submit", content=chunks(), headers={**admin, "content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    csrf = form_token(c.get("/login").text)
    r = c.post(
        "/login",
        content=(b"csrf_token=" + csrf.encode() + b"&username=" + b"a" * 1000 for _ in range(5)),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 413, r.text


# 7 ---------------------------------------------------------------------------------------
def test_openapi_declares_the_error_responses_and_content_types(web: Web) -> None:
    spec = web.client().get("/openapi.json").json()
    public = {"/api/health", "/api/register", "/api/login"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            where = f"{method.upper()} {path}"
            if path not in public:
                assert "401" in codes, where
            if (method == "post" and path not in public) or "{task_set_id}" in path:
                assert "403" in codes, where  # CSRF for cookie writes, role for admin ones
            if "{task_set_id}" in path:
                assert "404" in codes, where
            if method == "post":
                assert "413" in codes, where
            if "requestBody" in op or op.get("parameters"):
                assert "422" in codes, where
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert "application/json" in resp["content"], (where, code)
    paths = spec["paths"]
    assert {"409", "429"} <= set(paths["/api/submit"]["post"]["responses"])
    assert "409" in paths["/api/tasks"]["get"]["responses"]
    assert {"401", "429"} <= set(paths["/api/login"]["post"]["responses"])
    assert "429" in paths["/api/register"]["post"]["responses"]
    assert "503" in paths["/api/health"]["get"]["responses"]
    export_ok = paths["/api/task-sets/{task_set_id}/export"]["get"]["responses"]["200"]
    assert set(export_ok["content"]) == {"application/x-ndjson", "application/json", "text/csv"}
    assert (
        "application/json"
        not in paths["/api/task-sets/{task_set_id}/export"]["get"]["responses"]["200"]["content"][
            "application/x-ndjson"
        ]
    )


def test_login_failures_say_401_and_the_throttle_says_when_to_retry(
    make_web: Callable[..., Web],
) -> None:
    web = make_web(login_per_minute=2)
    c = web.client()
    r = c.post("/api/login", json={"username": "admin", "password": "wrong password"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    c.post("/api/login", json={"username": "admin", "password": "wrong password"})
    r = c.post("/api/login", json={"username": "admin", "password": PASSWORD})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    token = form_token(c.get("/login").text)
    r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1


# 8 ---------------------------------------------------------------------------------------
def test_every_content_shape_renders_and_the_favicon_exists(web: Web) -> None:
    ts = web.store.create_task_set(
        "shapes", {"kind": "single_choice", "choices": ["ok", "no"]}, k=1, gold_share=0.0
    )
    nested = {"prompt": "Summarise", "meta": {"lang": "en", "tags": ["a", "b"]}, "n": 3}
    shapes: list[object] = [nested, ["first", {"k": "v"}], {"items": [1, 2.5, None, True]}]
    web.store.add_tasks(
        ts.id, [TaskInput(content=s, external_id=f"s{i}") for i, s in enumerate(shapes)]
    )
    c = web.client()
    register(c, "viewer")
    seen = []
    for _ in shapes:
        page = c.get(f"/annotate/{ts.id}")
        assert page.status_code == 200, page.text
        html = page.text
        seen.append(html)
        tid = int(html.split('name="task_id" value="')[1].split('"')[0])
        c.post(
            f"/annotate/{ts.id}",
            data={"csrf_token": form_token(html), "task_id": tid, "value": "ok"},
        )
    joined = "\n".join(seen)
    # nested values are shown as JSON, never as Python reprs
    assert "{&#39;lang&#39;" not in joined
    assert "{'lang'" not in joined
    assert "&#34;lang&#34;" in joined or "&quot;lang&quot;" in joined or '"lang"' in joined
    assert "Summarise" in joined
    assert "first" in joined
    assert "2.5" in joined
    r = c.get("/favicon.ico")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/")


# 9 ---------------------------------------------------------------------------------------
def _exchange(a: CurationStore, b: CurationStore) -> tuple[int, int]:
    ra = a.merge_records([decode_record(x) for x in b.get_records(b.record_digests())])
    rb = b.merge_records([decode_record(x) for x in a.get_records(a.record_digests())])
    return len(ra.conflicts), len(rb.conflicts)


def test_replicas_never_end_with_two_accounts_answering_to_one_admin_name(
    tmp_path: Path,
) -> None:
    def open_store(name: str) -> CurationStore:
        return CurationStore.open(
            f"sqlite:///{tmp_path / name}", NodeIdentity.generate(), password_hasher=FAST_HASHER
        )

    a, b, c3 = open_store("a.db"), open_store("b.db"), open_store("c.db")
    try:
        a_admin = a.create_annotator("admin", "password of a", role="admin")
        b_admin = b.create_annotator("admin", "password of b", role="admin")
        assert _exchange(a, b) == (0, 0)
        for store, mine, _theirs, pw in (
            (a, a_admin, b_admin, "password of a"),
            (b, b_admin, a_admin, "password of b"),
        ):
            accounts = store.list_annotators()
            admins = [x for x in accounts if x.role == "admin"]
            assert [x.id for x in admins] == [mine.id]
            assert [x.username for x in accounts].count("admin") == 1
            assert store.authenticate("admin", pw).role == "admin"
            # the other node's account is held (its annotations can merge) under another name
            other = [x for x in accounts if x.username != "admin"]
            assert len(other) == 1
            assert other[0].role == "annotator"
            assert other[0].username.startswith("admin~")
        # a third node hears both, in either order, and names them the same way
        everything = a.get_records(a.record_digests())
        c3.merge_records([decode_record(x) for x in reversed(everything)])
        names_c = sorted(x.username for x in c3.list_annotators())
        d = open_store("d.db")
        try:
            d.merge_records([decode_record(x) for x in everything])
            assert sorted(x.username for x in d.list_annotators()) == names_c
            assert [x.role for x in d.list_annotators()] == ["annotator", "annotator"]
        finally:
            d.close()
    finally:
        for s in (a, b, c3):
            s.close()


# 10 --------------------------------------------------------------------------------------
def test_the_database_files_are_private_to_the_owner(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        url = default_db_url(tmp_path / "node")
        store = CurationStore.open(url, NodeIdentity.generate(), rng=random.Random(0))
        try:
            store.create_task_set("s", {"kind": "pairwise"}, k=1)
            files = sorted((tmp_path / "node").glob("curation.db*"))
            assert files, "no database file"
            for f in files:
                mode = stat.S_IMODE(f.stat().st_mode)
                assert mode & 0o077 == 0, f"{f.name} is {oct(mode)}"
        finally:
            store.close()
    finally:
        os.umask(old)


def test_login_page_still_works_after_the_fixes(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    assert c.get("/admin").status_code == 200
