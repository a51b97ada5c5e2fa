"""Editing a task set's label configuration: the admin page (forms, no JavaScript) and the
API, on a real SQLite store."""

from __future__ import annotations

import json

from web_helpers import PASSWORD, Web, api_token, form_token, login, register

CHOICES = ["positive", "negative", "neutral"]


def _answer_all(web: Web, user: str, value: str) -> None:
    info = web.store.create_annotator(user, PASSWORD)
    while (lt := web.store.next_task(info.id, web.task_set_id)) is not None:
        web.store.submit(info.id, lt.task_id, value, 500)


def _schema(*choices: str) -> str:
    return json.dumps({"kind": "single_choice", "choices": list(choices)})


def test_preview_shows_the_annotator_view_and_saving_makes_a_new_version(web: Web) -> None:
    c = web.client()
    login(c, "admin")
    url = f"/admin/task-sets/{web.task_set_id}/label-config"
    page = c.get(url)
    assert page.status_code == 200
    assert 'id="config-version">1<' in page.text
    assert f'href="{url}"' in c.get(f"/admin/task-sets/{web.task_set_id}").text
    csrf = form_token(page.text)
    form = {"csrf_token": csrf, "expected_version": "1"}
    r = c.post(url, data=form | {"label_schema": _schema(*CHOICES, "mixed"), "mode": "preview"})
    assert r.status_code == 200
    assert "Choices added: mixed" in r.text
    assert 'id="config-compatible"' in r.text
    assert 'value="mixed"' in r.text  # the new choice in the annotator preview
    assert web.store.get_task_set(web.task_set_id).config_version == 1  # a preview saves nothing
    r = c.post(url, data=form | {"label_schema": _schema(*CHOICES, "mixed"), "mode": "save"})
    assert r.status_code == 200
    assert "Saved as version 2" in r.text
    assert web.store.get_task_set(web.task_set_id).schema.choices[-1] == "mixed"  # type: ignore[union-attr]
    # a form made against version 1 is now stale
    r = c.post(url, data=form | {"label_schema": _schema(*CHOICES), "mode": "save"})
    assert r.status_code == 409
    assert "version 2 is in force" in r.text


def test_removing_a_used_choice_needs_confirmation_on_the_page(web: Web) -> None:
    _answer_all(web, "ann1", "negative")
    c = web.client()
    login(c, "admin")
    url = f"/admin/task-sets/{web.task_set_id}/label-config"
    form = {
        "csrf_token": form_token(c.get(url).text),
        "label_schema": _schema("positive", "neutral"),
    }
    r = c.post(url, data=form | {"mode": "save"})
    assert r.status_code == 409
    assert "&#39;negative&#39; (6 annotations)" in r.text
    assert 'id="config-confirm"' in r.text
    assert web.store.get_task_set(web.task_set_id).config_version == 1
    r = c.post(url, data=form | {"mode": "save", "confirm": "on"})
    assert r.status_code == 200
    assert "Saved as version 2" in r.text
    assert 'id="config-stale"' in r.text  # the kept annotations are flagged
    # invalid JSON and a change of kind are refused with a message, nothing saved
    bad = c.post(url, data=form | {"label_schema": "{oops", "mode": "preview"})
    assert bad.status_code == 422
    assert "not valid JSON" in bad.text
    kind = c.post(url, data=form | {"label_schema": '{"kind": "rating"}', "mode": "save"})
    assert kind.status_code == 422
    assert "kind cannot change" in kind.text


def test_label_config_api_checks_confirms_and_lists_versions(web: Web) -> None:
    _answer_all(web, "ann1", "neutral")
    c = web.client()
    token = api_token(c, "admin")
    auth = {"authorization": f"Bearer {token}"}
    url = f"/api/task-sets/{web.task_set_id}/label-config"
    narrower = {"kind": "single_choice", "choices": ["positive", "negative"]}
    dry = c.put(
        url, json={"label_schema": narrower, "dry_run": True, "confirm": True}, headers=auth
    )
    assert dry.status_code == 200, dry.text
    assert dry.json()["saved"] is False
    assert dry.json()["invalidated"] == [{"label": "neutral", "annotations": 6, "gold": 0}]
    refused = c.put(url, json={"label_schema": narrower}, headers=auth)
    assert refused.status_code == 409
    assert "'neutral' (6 annotations)" in refused.json()["detail"]
    ok = c.put(url, json={"label_schema": narrower, "confirm": True, "expected_version": 1},
               headers=auth)  # fmt: skip
    assert ok.status_code == 200
    assert ok.json()["version"] == 2
    assert ok.json()["saved"]
    history = c.get(f"/api/task-sets/{web.task_set_id}/label-configs", headers=auth).json()
    assert [(v["version"], v["in_force"], v["annotations"]) for v in history] == [
        (2, True, 0),
        (1, False, 6),
    ]
    sets = c.get("/api/task-sets", headers=auth).json()
    assert sets[0]["config_version"] == 2
    assert c.put(url, json={"label_schema": {"kind": "pairwise"}}, headers=auth).status_code == 422
    # annotators may not edit
    c2 = web.client()
    register(c2, "annie")
    annie = {"authorization": f"Bearer {api_token(c2, 'annie')}"}
    assert c2.put(url, json={"label_schema": narrower}, headers=annie).status_code == 403


def test_label_config_operations_declare_their_responses(web: Web) -> None:
    spec = web.client().get("/openapi.json").json()
    put = spec["paths"]["/api/task-sets/{task_set_id}/label-config"]["put"]
    assert {"200", "401", "403", "404", "409", "413", "422"} <= set(put["responses"])
    get = spec["paths"]["/api/task-sets/{task_set_id}/label-configs"]["get"]
    assert {"200", "401", "403", "404"} <= set(get["responses"])
