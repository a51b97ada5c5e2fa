"""The label configuration page of a task set: edit the schema with a preview of what
annotators will see and of what the change does to stored annotations, then save it as a
new version. Plain HTML forms (no JavaScript needed); the API twin is
``PUT /api/task-sets/{id}/label-config``. The rules live in ``curation/label_config.py``."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from swarmlm.curation import data_manager as dm
from swarmlm.curation.errors import CurationError, LabelSchemaError
from swarmlm.curation.label_config import ConfigImpact, LabelConfigConflictError
from swarmlm.curation.schema import LabelSchema, parse_schema, schema_to_dict
from swarmlm.web.deps import (
    AdminPage,
    AppState,
    PathId,
    Principal,
    State,
    check_form_csrf,
)
from swarmlm.web.pages import render

pages = APIRouter(prefix="/admin", include_in_schema=False)


def _choices_diff(old: LabelSchema, new: LabelSchema) -> dict[str, list[str]]:
    before = list(getattr(old, "choices", []))
    after = list(getattr(new, "choices", []))
    return {
        "added": [c for c in after if c not in before],
        "removed": [c for c in before if c not in after],
    }


def _page(
    request: Request,
    state: AppState,
    principal: Principal,
    task_set_id: int,
    *,
    text: str | None = None,
    preview: dict[str, Any] | None = None,
    error: str | None = None,
    impact: ConfigImpact | None = None,
    saved: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    ts = state.store.get_task_set(task_set_id)
    page = dm.query_tasks(state.store, task_set_id, per_page=1)
    sample = dm.task_detail(state.store, page.rows[0].id) if page.rows else None
    stale = state.store.label_config_impact(task_set_id, ts.schema)
    return render(
        request,
        state,
        "admin/label_config.html",
        {
            "ts": ts,
            "text": text if text is not None else json.dumps(schema_to_dict(ts.schema), indent=2),
            "history": state.store.label_config_history(task_set_id),
            "stale": stale,
            "sample": sample,
            "preview": preview,
            "error": error,
            "impact": impact,
            "saved": saved,
        },
        status_code=status_code,
        principal=principal,
    )


@pages.get("/task-sets/{task_set_id}/label-config")
def label_config_page(
    *,
    request: Request,
    task_set_id: PathId,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    return _page(request, state, principal, task_set_id, saved=request.query_params.get("saved"))


@pages.post("/task-sets/{task_set_id}/label-config")
def label_config_submit(
    *,
    request: Request,
    task_set_id: PathId,
    label_schema: Annotated[str, Form(max_length=20_000)],
    mode: Annotated[str, Form(pattern="^(preview|save)$")] = "preview",
    confirm: Annotated[str | None, Form(max_length=5)] = None,
    expected_version: Annotated[int | None, Form(ge=1, le=2**31 - 1)] = None,
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: AdminPage,
    state: State,
) -> Response:
    """Preview (a dry run: nothing saved) or save the schema typed into the form."""
    check_form_csrf(principal, csrf_token)
    ts = state.store.get_task_set(task_set_id)
    try:
        try:
            raw = json.loads(label_schema)
        except json.JSONDecodeError as e:
            raise LabelSchemaError(
                f"label configuration: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
        new = parse_schema(raw)
        change = state.store.update_label_config(
            task_set_id,
            new,
            confirm=confirm == "on",
            dry_run=mode == "preview",
            expected_version=expected_version,
        )
    except LabelConfigConflictError as e:
        return _page(request, state, principal, task_set_id, text=label_schema, error=str(e),
                     impact=e.impact, status_code=409)  # fmt: skip
    except CurationError as e:
        status = 422 if isinstance(e, LabelSchemaError) else 409
        return _page(request, state, principal, task_set_id, text=label_schema, error=str(e),
                     status_code=status)  # fmt: skip
    if change.saved:
        return RedirectResponse(
            f"/admin/task-sets/{task_set_id}/label-config?saved={change.version}", status_code=303
        )
    preview = {
        "schema": change.schema,
        "changed": change.changed,
        "diff": _choices_diff(ts.schema, change.schema),
    }
    return _page(request, state, principal, task_set_id, text=label_schema, preview=preview,
                 impact=change.impact)  # fmt: skip
