"""Administrator pages: statistics with charts, task sets (create, import, monitor, export),
annotators (roles, disable) and system health. Every route requires the admin role."""

from __future__ import annotations

import json
import platform
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from swarmlm.curation.errors import CurationError
from swarmlm.curation.interchange import parse_tasks_text
from swarmlm.web.deps import AppState, Principal, app_state, check_form_csrf, page_admin
from swarmlm.web.pages import render

router = APIRouter(prefix="/admin", include_in_schema=False)
PathId = Annotated[int, Path(ge=1, le=2**31 - 1)]
_STARTED = time.time()


def _hourly_bars(per_hour: dict[int, int], now: float) -> list[dict[str, Any]]:
    """24 bars, oldest first, heights in percent of the busiest hour (for the SVG chart)."""
    current = int(now // 3600)
    counts = [per_hour.get((current - 23 + i) * 3600, 0) for i in range(24)]
    top = max(counts) or 1
    return [
        {"hours_ago": 23 - i, "count": c, "height": round(100 * c / top, 1)}
        for i, c in enumerate(counts)
    ]


@router.get("")
def overview(
    *,
    request: Request,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> HTMLResponse:
    stats = state.store.stats()
    progress = [
        state.store.progress(ts.id, with_agreement=False) for ts in state.store.list_task_sets()
    ]
    return render(
        request,
        state,
        "admin/index.html",
        {
            "stats": stats,
            "bars": _hourly_bars(stats["annotations_per_hour"], time.time()),
            "progress": progress,
        },
        principal=principal,
    )


@router.get("/task-sets/new")
def new_task_set(
    *,
    request: Request,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> HTMLResponse:
    return render(request, state, "admin/new_task_set.html", {"error": None}, principal=principal)


@router.post("/task-sets")
def create_task_set(
    *,
    request: Request,
    name: Annotated[str, Form(max_length=200)],
    kind: Annotated[str, Form(max_length=32)],
    choices: Annotated[str, Form(max_length=5000)] = "",
    rating_min: Annotated[int, Form(ge=-100, le=100)] = 1,
    rating_max: Annotated[int, Form(ge=-100, le=100)] = 5,
    ranking_k: Annotated[int, Form(ge=2, le=9)] = 3,
    k: Annotated[int, Form(ge=1, le=100)] = 3,
    threshold: Annotated[float, Form(ge=0.0, le=1.0)] = 0.6,
    gold_share: Annotated[float, Form(ge=0.0, le=1.0)] = 0.1,
    description: Annotated[str, Form(max_length=5000)] = "",
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> Response:
    check_form_csrf(principal, csrf_token)
    schema: dict[str, Any] = {"kind": kind}
    if kind in ("single_choice", "multiple_choice"):
        schema["choices"] = [c.strip() for c in choices.split(",") if c.strip()]
    elif kind == "rating":
        schema.update(min=rating_min, max=rating_max)
    elif kind == "ranking":
        schema["k"] = ranking_k
    try:
        ts = state.store.create_task_set(
            name,
            schema,
            k=k,
            agreement_threshold=threshold,
            gold_share=gold_share,
            description=description,
        )
    except CurationError as e:
        return render(
            request,
            state,
            "admin/new_task_set.html",
            {"error": str(e)},
            status_code=422,
            principal=principal,
        )
    return RedirectResponse(f"/admin/task-sets/{ts.id}", status_code=303)


@router.get("/task-sets/{task_set_id}")
def task_set_detail(
    *,
    request: Request,
    task_set_id: PathId,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> HTMLResponse:
    p = state.store.progress(task_set_id)
    msg = request.query_params.get("imported")
    return render(
        request,
        state,
        "admin/task_set.html",
        {"p": p, "ts": p.task_set, "imported": msg, "error": None},
        principal=principal,
    )


@router.post("/task-sets/{task_set_id}/import")
async def import_file(
    *,
    request: Request,
    task_set_id: PathId,
    file: Annotated[UploadFile, File()],
    fmt: Annotated[str, Form(max_length=20)] = "auto",
    outputs_keys: Annotated[str, Form(max_length=500)] = "",
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> Response:
    check_form_csrf(principal, csrf_token)
    name = file.filename or "upload"
    if fmt == "auto":
        fmt = "label_studio" if name.lower().endswith(".json") else "jsonl"
    try:
        text = (await file.read()).decode("utf-8")
        keys = [k.strip() for k in outputs_keys.split(",") if k.strip()] or None
        tasks = parse_tasks_text(text, fmt, name, keys)
        n = state.store.add_tasks(task_set_id, tasks, source=name)
    except (CurationError, UnicodeDecodeError) as e:
        p = state.store.progress(task_set_id)
        return render(
            request,
            state,
            "admin/task_set.html",
            {"p": p, "ts": p.task_set, "imported": None, "error": str(e)},
            status_code=422,
            principal=principal,
        )
    return RedirectResponse(f"/admin/task-sets/{task_set_id}?imported={n}", status_code=303)


@router.get("/annotators")
def annotators(
    *,
    request: Request,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> HTMLResponse:
    return render(
        request,
        state,
        "admin/annotators.html",
        {"rows": state.store.list_annotators()},
        principal=principal,
    )


@router.post("/annotators/{annotator_id}")
def update_annotator(
    *,
    annotator_id: PathId,
    action: Annotated[str, Form(max_length=20)],
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> Response:
    check_form_csrf(principal, csrf_token)
    if annotator_id == principal.annotator.id and action in ("disable", "make_annotator"):
        raise CurationError("administrators cannot disable or demote themselves")
    actions = {
        "disable": lambda: state.store.set_disabled(annotator_id, True),
        "enable": lambda: state.store.set_disabled(annotator_id, False),
        "make_admin": lambda: state.store.set_role(annotator_id, "admin"),
        "make_annotator": lambda: state.store.set_role(annotator_id, "annotator"),
    }
    if action not in actions:
        raise CurationError(f"unknown action {action!r}; choose from {sorted(actions)}")
    actions[action]()
    return RedirectResponse("/admin/annotators", status_code=303)


@router.get("/health")
def health(
    *,
    request: Request,
    principal: Annotated[Principal, Depends(page_admin)],
    state: Annotated[AppState, Depends(app_state)],
) -> HTMLResponse:
    try:
        db = state.store.health()
        ok = True
    except Exception as e:
        db = {"error": f"{type(e).__name__}: {e}"}
        ok = False
    info = {
        "ok": ok,
        "database": db,
        "db_url": state.store.engines.url,
        "uptime_s": int(time.time() - _STARTED),
        "python": platform.python_version(),
        "settings": json.dumps(state.settings.model_dump(mode="json"), indent=2),
    }
    return render(request, state, "admin/health.html", info, principal=principal)
