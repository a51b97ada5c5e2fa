"""The API body, its response and the admin form of a new task set all follow
``TaskSetSettings``: each setting is accepted, shown and refused by name, from one model."""

from __future__ import annotations

import re
from typing import Any

from web_helpers import Web, api_token, form_token, login

from swarmlm.curation import data_manager as dm
from swarmlm.curation.store import TaskInput, TaskSetSettings

SETTINGS = list(TaskSetSettings.model_fields)


def _admin_api(web: Web) -> tuple[Any, dict[str, str]]:
    c = web.client()
    return c, {"authorization": f"Bearer {api_token(c, 'admin')}"}


def test_the_api_takes_and_returns_every_setting(web: Web) -> None:
    c, admin = _admin_api(web)
    sent = {"k": 2, "max_annotations": 5, "agreement_threshold": 0.75, "gold_share": 0.0}
    r = c.post(
        "/api/task-sets",
        json={"name": "prefs", "label_schema": {"kind": "pairwise"}, **sent, "lease_seconds": 30},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    out = r.json()
    assert {k: out[k] for k in SETTINGS} == {**sent, "lease_seconds": 30}
    assert out["label_schema"] == {"kind": "pairwise"}
    listed = {ts["name"]: ts for ts in c.get("/api/task-sets", headers=admin).json()}
    assert listed["prefs"] == out
    # the OpenAPI schema documents each setting with its bounds, from the model
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    body = schemas["TaskSetIn"]["properties"]
    assert set(SETTINGS) <= set(body)
    assert (body["k"]["minimum"], body["k"]["maximum"]) == (1, 100)
    assert schemas["TaskSetIn"]["additionalProperties"] is False


def test_the_api_refuses_a_bad_or_unknown_setting_with_422_naming_it(web: Web) -> None:
    c, admin = _admin_api(web)
    base = {"name": "x", "label_schema": {"kind": "pairwise"}}
    for extra, named in [
        ({"k": 4, "max_annotations": 3}, "max_annotations must be at least k=4, got 3"),
        ({"gold_share": 2}, "gold_share"),
        ({"leese_seconds": 60}, "leese_seconds"),
    ]:
        r = c.post("/api/task-sets", json={**base, **extra}, headers=admin)
        assert r.status_code == 422, (extra, r.text)
        assert named in r.text
    assert [ts["name"] for ts in c.get("/api/task-sets", headers=admin).json()] == ["sentiment"]


def test_the_admin_form_has_an_input_per_setting_and_refuses_bad_ones_in_the_page(
    web: Web,
) -> None:
    c = web.client()
    login(c, "admin")
    page = c.get("/admin/task-sets/new").text
    inputs = re.findall(r'<input name="([a-z_]+)" type="number" value="([^"]*)"', page)
    defaults = TaskSetSettings.model_fields
    for name in SETTINGS:
        assert (name, "" if defaults[name].default is None else str(defaults[name].default)) in (
            inputs
        )
    csrf = form_token(page)
    form = {"name": "topics", "kind": "single_choice", "choices": "a, b", "csrf_token": csrf}
    bad = c.post("/admin/task-sets", data={**form, "k": "3", "max_annotations": "2"})
    assert bad.status_code == 422
    assert "max_annotations must be at least k=3, got 2" in bad.text
    assert 'name="lease_seconds"' in bad.text  # the form again, to correct
    ok = c.post("/admin/task-sets", data={**form, "k": "1", "lease_seconds": "45"})
    assert ok.status_code == 200, ok.text
    made = web.store.find_task_set("topics")
    assert (made.k, made.max_annotations, made.lease_seconds) == (1, 2, 45)
    assert made.agreement_threshold == TaskSetSettings().agreement_threshold


def test_a_cap_raised_past_the_creation_bound_is_still_listed(web: Web) -> None:
    """The bounds are a new set's: the data manager's raise_redundancy may lift a stored cap
    past 1000, and the set must still be readable (values read back are not re-validated)."""
    ts = web.store.create_task_set("big", {"kind": "pairwise"}, k=100, max_annotations=1000)
    web.store.add_tasks(ts.id, [TaskInput(content="q", outputs=["a", "b"])])
    task_id = web.store.list_tasks(ts.id)[0].id
    for _ in range(91):  # needed 100 -> 1010
        assert dm.bulk_action(web.store, ts.id, [task_id], "raise_redundancy", 10) == 1
    assert web.store.get_task_set(ts.id).max_annotations == 1010
    c, admin = _admin_api(web)
    r = c.get("/api/task-sets", headers=admin)
    assert r.status_code == 200, r.text
    assert {t["name"]: t["max_annotations"] for t in r.json()}["big"] == 1010
