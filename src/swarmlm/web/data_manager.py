"""The data manager and task view: admin pages and their JSON twins under ``/api``.

Filters travel in the query string of a plain GET form (bookmarkable, usable without
JavaScript, no CSRF needed since nothing changes); bulk actions are a POST with the CSRF
token, applied either to the ticked rows or to everything the current filter matches
(Label Studio's ``selectedItems: {all: true}``), then redirect back (post/redirect/get).
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from swarmlm.config import StrictModel
from swarmlm.curation import data_manager as dm
from swarmlm.curation.errors import CurationError
from swarmlm.curation.review import VERDICTS
from swarmlm.curation.schema import (
    PAIRWISE_VALUES,
    LabelSchema,
    MultipleChoiceSchema,
    PairwiseSchema,
    RatingSchema,
    SingleChoiceSchema,
)
from swarmlm.web.api import USER_READ, USER_WRITE, error_responses
from swarmlm.web.deps import (
    AdminPage,
    ApiAdmin,
    ApiWriteAdmin,
    PathId,
    State,
    check_form_csrf,
)
from swarmlm.web.pages import render

pages = APIRouter(prefix="/admin", include_in_schema=False)
api = APIRouter(prefix="/api", tags=["data manager"])
FILTER_FIELDS = (
    "status",
    "label",
    "confidence_min",
    "confidence_max",
    "agreement_min",
    "agreement_max",
    "annotator",
    "gold",
    "created_from",
    "created_to",
    "search",
)


def label_choices(schema: LabelSchema) -> list[str]:
    """The values a label filter or a reviewer's correction can pick from ([] for free
    text and rankings, which are typed)."""
    if isinstance(schema, SingleChoiceSchema | MultipleChoiceSchema):
        return list(schema.choices)
    if isinstance(schema, PairwiseSchema):
        return list(PAIRWISE_VALUES)
    if isinstance(schema, RatingSchema):
        return [str(v) for v in range(schema.min, schema.max + 1)]
    return []


def _opt_float(raw: str | None, name: str) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        return float(raw)
    except ValueError as e:
        raise HTTPException(422, f"{name} must be a number, got {raw[:40]!r}") from e


def _opt_date(raw: str | None, name: str) -> date | None:
    if raw is None or not raw.strip():
        return None
    try:
        return date.fromisoformat(raw.strip())
    except ValueError as e:
        raise HTTPException(422, f"{name} must be a date (YYYY-MM-DD), got {raw[:40]!r}") from e


def _opt_text(raw: str | None, limit: int = 500) -> str | None:
    if raw is None or not raw.strip():
        return None
    return raw.strip()[:limit]


def filter_from(values: Any) -> dm.TaskFilter:
    """A :class:`TaskFilter` from query or form fields; blank fields mean "any"."""
    gold_raw = _opt_text(values.get("gold"))
    if gold_raw not in (None, "yes", "no"):
        raise HTTPException(422, "gold must be 'yes' or 'no'")
    status = _opt_text(values.get("status"))
    try:
        return dm.TaskFilter(
            status=status,
            label=_opt_text(values.get("label")),
            confidence_min=_opt_float(values.get("confidence_min"), "confidence_min"),
            confidence_max=_opt_float(values.get("confidence_max"), "confidence_max"),
            agreement_min=_opt_float(values.get("agreement_min"), "agreement_min"),
            agreement_max=_opt_float(values.get("agreement_max"), "agreement_max"),
            annotator=_opt_text(values.get("annotator"), 64),
            gold=None if gold_raw is None else gold_raw == "yes",
            created_from=_opt_date(values.get("created_from"), "created_from"),
            created_to=_opt_date(values.get("created_to"), "created_to"),
            search=_opt_text(values.get("search")),
        )
    except CurationError as e:
        raise HTTPException(422, str(e)) from e


def _filter_query(values: Any) -> dict[str, str]:
    return {k: str(values.get(k)) for k in FILTER_FIELDS if (values.get(k) or "").strip()}


def _sort_and_page(values: Any) -> tuple[str, int, int]:
    sort = values.get("sort") or "id"
    if sort.lstrip("-") not in dm.SORTS:
        raise HTTPException(422, f"sort must be one of {sorted(dm.SORTS)}, optionally with '-'")
    try:
        page = int(values.get("page") or 1)
        per_page = int(values.get("per_page") or 50)
    except ValueError as e:
        raise HTTPException(422, "page and per_page must be whole numbers") from e
    if not 1 <= page <= 1_000_000 or not 1 <= per_page <= dm.MAX_PAGE:
        raise HTTPException(422, f"page must be >= 1 and per_page 1..{dm.MAX_PAGE}")
    return sort, page, per_page


@pages.get("/task-sets/{task_set_id}/tasks")
async def data_manager_page(
    *,
    request: Request,
    task_set_id: PathId,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    q = request.query_params
    f = filter_from(q)
    sort, page, per_page = _sort_and_page(q)
    ts = state.store.get_task_set(task_set_id)
    result = await run_in_threadpool(
        dm.query_tasks, state.store, task_set_id, f, sort=sort, page=page, per_page=per_page
    )
    base = _filter_query(q)
    keep = {**base, "sort": sort, "per_page": str(per_page)}

    def link(**changes: Any) -> str:
        return "?" + urlencode({**keep, **{k: str(v) for k, v in changes.items()}})

    labels = label_choices(ts.schema)
    return render(
        request,
        state,
        "admin/data_manager.html",
        {
            "ts": ts,
            "result": result,
            "f": base,
            "sort": sort,
            "per_page": per_page,
            "labels": labels,
            "sorts": sorted(dm.SORTS),
            "statuses": dm.STATUSES,
            "actions": dm.BULK_ACTIONS,
            "prev_link": link(page=page - 1) if page > 1 else None,
            "next_link": link(page=page + 1) if page < result.pages else None,
            # echoed only in the shape this app writes (a link cannot make it say anything)
            "done": done
            if re.fullmatch(r"[a-z_]+: \d+ tasks", done := q.get("done") or "")
            else None,
        },
        principal=principal,
    )


def _form_str(form: FormData, name: str) -> str | None:
    v = form.get(name)
    return v if isinstance(v, str) else None


@pages.post("/task-sets/{task_set_id}/tasks/bulk")
async def data_manager_bulk(
    *,
    request: Request,
    task_set_id: PathId,
    principal: AdminPage,
    state: State,
) -> Response:
    form = await request.form()
    check_form_csrf(principal, _form_str(form, "csrf_token"))
    action = _form_str(form, "action") or ""
    scope = _form_str(form, "scope") or "selected"
    try:
        amount = int(_form_str(form, "amount") or 1)
    except ValueError as e:
        raise HTTPException(422, "amount must be a whole number") from e
    f = filter_from(form)
    if scope == "all":
        ids = await run_in_threadpool(dm.matching_ids, state.store, task_set_id, f)
    else:
        try:
            ids = [int(str(v)) for v in form.getlist("ids")][: dm.MAX_BULK]
        except ValueError as e:
            raise HTTPException(422, "ids must be task ids") from e
    if not ids:
        raise HTTPException(422, "no tasks selected: tick some rows or choose 'all matching'")
    try:
        n = await run_in_threadpool(dm.bulk_action, state.store, task_set_id, ids, action, amount)
    except CurationError as e:
        raise HTTPException(422, str(e)) from e
    back = {**_filter_query(form), "done": f"{action}: {n} tasks"}
    return RedirectResponse(
        f"/admin/task-sets/{task_set_id}/tasks?{urlencode(back)}", status_code=303
    )


@pages.get("/tasks/{task_id}")
async def task_page(
    *,
    request: Request,
    task_id: PathId,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    d = await run_in_threadpool(dm.task_detail, state.store, task_id)
    labels = label_choices(d.task_set.schema)
    return render(
        request,
        state,
        "admin/task.html",
        {
            "d": d,
            "labels": labels,
            "reviewed": r if (r := request.query_params.get("reviewed")) in VERDICTS else None,
        },
        principal=principal,
    )


# -- JSON twins ------------------------------------------------------------------------------
class TaskRowOut(BaseModel):
    id: int
    external_id: str
    preview: str
    status: str
    is_gold: bool
    n_annotations: int
    needed: int
    n_leased: int
    consensus: Any
    agreement: float | None
    confidence: float | None
    created_at: str


class TaskPageOut(BaseModel):
    tasks: list[TaskRowOut]
    total: int
    total_capped: bool = Field(description=f"more than {dm.COUNT_CAP} match: total is the cap")
    page: int
    per_page: int


class AnnotationOut(BaseModel):
    id: int
    annotator: str
    reputation: float
    value: Any
    time_spent_ms: int
    created_at: str
    agrees_with_consensus: bool | None
    review: str | None


class TaskDetailOut(BaseModel):
    id: int
    task_set_id: int
    external_id: str
    content: Any
    outputs: list[str] | None
    is_gold: bool
    gold: Any
    status: str
    needed: int
    n_annotations: int
    consensus: Any
    confidence: float | None
    agreement: float | None
    annotations: list[AnnotationOut]
    history: list[dict[str, str]]


class BulkIn(StrictModel):
    action: Literal["release", "raise_redundancy", "mark_gold", "unmark_gold", "delete"]
    task_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(max_length=dm.MAX_BULK)
    amount: int = Field(default=1, ge=1, le=10)


class BulkOut(BaseModel):
    changed: int


@api.get("/task-sets/{task_set_id}/tasks", responses=error_responses(*USER_READ, 404, 422))
async def list_tasks(
    *,
    request: Request,
    task_set_id: PathId,
    status: Annotated[str | None, Query(max_length=20)] = None,
    label: Annotated[str | None, Query(max_length=500)] = None,
    confidence_min: Annotated[float | None, Query(ge=0, le=1)] = None,
    confidence_max: Annotated[float | None, Query(ge=0, le=1)] = None,
    agreement_min: Annotated[float | None, Query(ge=0, le=1)] = None,
    agreement_max: Annotated[float | None, Query(ge=0, le=1)] = None,
    annotator: Annotated[str | None, Query(max_length=64)] = None,
    gold: Annotated[Literal["yes", "no"] | None, Query()] = None,
    created_from: Annotated[date | None, Query()] = None,
    created_to: Annotated[date | None, Query()] = None,
    search: Annotated[str | None, Query(max_length=500)] = None,
    sort: Annotated[str, Query(pattern=r"^-?(id|agreement|confidence|annotations)$")] = "id",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=dm.MAX_PAGE)] = 50,
    _: ApiAdmin,
    state: State,
) -> TaskPageOut:
    """The data manager: one page of a task set's tasks, filtered, searched and sorted."""
    f = filter_from(request.query_params)
    result = await run_in_threadpool(
        dm.query_tasks, state.store, task_set_id, f, sort=sort, page=page, per_page=per_page
    )
    return TaskPageOut(
        tasks=[
            TaskRowOut(**{**r.__dict__, "created_at": r.created_at.isoformat()})
            for r in result.rows
        ],
        total=result.total,
        total_capped=result.total_capped,
        page=result.page,
        per_page=result.per_page,
    )


@api.get(
    "/task-sets/{task_set_id}/tasks/{task_id}", responses=error_responses(*USER_READ, 404, 422)
)
async def get_task(
    *,
    task_set_id: PathId,
    task_id: PathId,
    _: ApiAdmin,
    state: State,
) -> TaskDetailOut:
    """A task with every annotation, its consensus, posterior, agreement and history."""
    d = await run_in_threadpool(dm.task_detail, state.store, task_id)
    if d.task_set.id != task_set_id:
        raise HTTPException(404, f"task {task_id} is not in task set {task_set_id}")
    return TaskDetailOut.model_validate(
        {
            **vars(d),
            "task_set_id": d.task_set.id,
            "annotations": [
                AnnotationOut.model_validate(
                    {
                        **vars(a),
                        "annotator": a.username,
                        "reputation": round(a.reputation, 4),
                        "created_at": a.created_at.isoformat(),
                        "agrees_with_consensus": a.agrees,
                    }
                )
                for a in d.annotations
            ],
            "history": [
                {"at": h.at.isoformat(), "event": h.event, "who": h.who, "detail": h.detail}
                for h in d.history
            ],
        }
    )


@api.post("/task-sets/{task_set_id}/tasks/bulk", responses=error_responses(*USER_WRITE, 404))
async def bulk(
    *,
    task_set_id: PathId,
    body: BulkIn,
    _: ApiWriteAdmin,
    state: State,
) -> BulkOut:
    """Apply a bulk action to tasks of the set (ids of other sets are ignored)."""
    n = await run_in_threadpool(
        dm.bulk_action, state.store, task_set_id, body.task_ids, body.action, body.amount
    )
    return BulkOut(changed=n)
