"""Administrator pages: statistics with charts, task sets (create, import, monitor, export),
annotators (roles, disable) and system health. Every route requires the admin role."""

from __future__ import annotations

import json
import math
import platform
import time
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Path,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from swarmlm.curation import data_manager as dm
from swarmlm.curation.activity import annotator_activity, daily_series, day_label
from swarmlm.curation.errors import CurationError
from swarmlm.curation.interchange import guess_format, parse_tasks_text
from swarmlm.curation.review import review_counts, reviews_of
from swarmlm.curation.task_set_settings import TaskSetSettings
from swarmlm.web.deps import (
    AdminPage,
    AppState,
    PathId,
    Principal,
    State,
    check_form_csrf,
)
from swarmlm.web.node_view import NodeDashboard
from swarmlm.web.pages import render

router = APIRouter(prefix="/admin", include_in_schema=False)
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
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    stats = state.store.stats()
    progress = [
        state.store.progress(ts.id, with_agreement=False) for ts in state.store.list_task_sets()
    ]
    series = daily_series(state.store, 30)
    return render(
        request,
        state,
        "admin/index.html",
        {
            "stats": stats,
            "bars": _hourly_bars(stats["annotations_per_hour"], time.time()),
            "progress": progress,
            "daily": series,
            "throughput_chart": line_chart(
                [[i, float(n)] for i, n in enumerate(series.annotations)]
            ),
            "agreement_chart": line_chart(
                [[i, a] for i, a in enumerate(series.agreement) if a is not None]
            ),
            "queue_chart": line_chart([[i, float(n)] for i, n in enumerate(series.queue)]),
            "first_day": day_label(series.days[0]),
        },
        principal=principal,
    )


def settings_inputs() -> list[dict[str, Any]]:
    """The form's inputs for :class:`TaskSetSettings`, one per field, with the field's
    description as label and its default and bounds: a new setting appears in the form
    without editing the template."""
    inputs = []
    for name, info in TaskSetSettings.model_fields.items():
        bounds = {"min": None, "max": None}
        for rule in info.metadata:
            bounds["min"] = getattr(rule, "ge", bounds["min"])
            bounds["max"] = getattr(rule, "le", bounds["max"])
        default = info.get_default(call_default_factory=True)
        description = info.description or name
        inputs.append(
            {
                "name": name,
                "label": description[0].upper() + description[1:],
                "value": "" if default is None else default,
                "step": "any" if info.annotation is float else 1,
                **bounds,
            }
        )
    return inputs


def _new_task_set_page(
    request: Request, state: AppState, principal: Principal, error: str | None = None
) -> HTMLResponse:
    return render(
        request,
        state,
        "admin/new_task_set.html",
        {"error": error, "settings_inputs": settings_inputs()},
        status_code=200 if error is None else 422,
        principal=principal,
    )


async def _settings_form(request: Request) -> dict[str, str]:
    """The submitted values of the task-set settings (blank ones left to their default)."""
    form = await request.form()
    values = {name: form.get(name) for name in TaskSetSettings.model_fields}
    return {name: v for name, v in values.items() if isinstance(v, str) and v.strip()}


@router.get("/task-sets/new")
def new_task_set(
    *,
    request: Request,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    return _new_task_set_page(request, state, principal)


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
    description: Annotated[str, Form(max_length=5000)] = "",
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    settings: Annotated[dict[str, str], Depends(_settings_form)],
    principal: AdminPage,
    state: State,
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
        chosen = TaskSetSettings.parse(settings)
        ts = state.store.create_task_set(name, schema, chosen, description=description)
    except CurationError as e:
        return _new_task_set_page(request, state, principal, str(e))
    return RedirectResponse(f"/admin/task-sets/{ts.id}", status_code=303)


@router.get("/task-sets/{task_set_id}")
def task_set_detail(
    *,
    request: Request,
    task_set_id: PathId,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    return _task_set_page(
        request,
        state,
        principal,
        task_set_id,
        imported=request.query_params.get("imported"),
        saved=request.query_params.get("saved"),
    )


def _task_set_page(
    request: Request,
    state: AppState,
    principal: Principal,
    task_set_id: int,
    *,
    imported: str | None = None,
    saved: str | None = None,
    error: str | None = None,
    preview: dict[str, Any] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    p = state.store.progress(task_set_id)
    page = dm.query_tasks(state.store, task_set_id, per_page=1)
    sample = dm.task_detail(state.store, page.rows[0].id) if page.rows else None
    return render(
        request,
        state,
        "admin/task_set.html",
        {
            "p": p,
            "ts": p.task_set,
            "imported": imported,
            "saved": saved,
            "error": error,
            "preview": preview,
            "sample": sample,
            "reviews": review_counts(state.store, task_set_id),
        },
        status_code=status_code,
        principal=principal,
    )


@router.post("/task-sets/{task_set_id}/settings")
def task_set_settings(
    *,
    task_set_id: PathId,
    description: Annotated[str, Form(max_length=5000)] = "",
    active: Annotated[str | None, Form(max_length=5)] = None,
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: AdminPage,
    state: State,
) -> Response:
    check_form_csrf(principal, csrf_token)
    state.store.set_description(task_set_id, description.strip())
    state.store.set_task_set_active(task_set_id, active == "on")
    return RedirectResponse(f"/admin/task-sets/{task_set_id}?saved=1", status_code=303)


@router.post("/task-sets/{task_set_id}/import")
async def import_file(
    *,
    request: Request,
    task_set_id: PathId,
    file: Annotated[UploadFile, File()],
    fmt: Annotated[str, Form(max_length=20)] = "auto",
    outputs_keys: Annotated[str, Form(max_length=500)] = "",
    mode: Annotated[str, Form(max_length=10)] = "import",
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: AdminPage,
    state: State,
) -> Response:
    check_form_csrf(principal, csrf_token)
    name = file.filename or "upload"
    if fmt == "auto":
        fmt = guess_format(name)
    dry_run = mode == "preview"
    try:
        text = (await file.read()).decode("utf-8")
        keys = [k.strip() for k in outputs_keys.split(",") if k.strip()] or None
        tasks = parse_tasks_text(text, fmt, name, keys)
        n = await run_in_threadpool(
            lambda: state.store.add_tasks(task_set_id, tasks, source=name, dry_run=dry_run)
        )
    except (CurationError, UnicodeDecodeError) as e:
        return _task_set_page(request, state, principal, task_set_id, error=str(e), status_code=422)
    if dry_run:
        preview = {
            "file": name,
            "format": fmt,
            "count": n,
            "rows": [
                {
                    "external_id": t.external_id or f"(number {i + 1})",
                    "content": t.content,
                    "outputs": t.outputs,
                    "gold": t.gold,
                }
                for i, t in enumerate(tasks[:10])
            ],
        }
        return _task_set_page(request, state, principal, task_set_id, preview=preview)
    return RedirectResponse(f"/admin/task-sets/{task_set_id}?imported={n}", status_code=303)


@router.get("/annotators")
def annotators(
    *,
    request: Request,
    principal: AdminPage,
    state: State,
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
    request: Request,
    annotator_id: PathId,
    action: Annotated[str, Form(max_length=20)],
    where: Annotated[str, Form(max_length=10)] = "list",
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: AdminPage,
    state: State,
) -> Response:
    check_form_csrf(principal, csrf_token)
    if annotator_id == principal.annotator.id and action in (
        "disable",
        "make_annotator",
        "make_reviewer",
        "reset_password",
    ):
        raise CurationError("administrators cannot disable, demote or reset themselves")
    if action == "reset_password":
        who = state.store.get_annotator(annotator_id)
        password = state.store.reset_password(annotator_id)
        # Shown once, in this response only (never in a URL, a log or the database).
        return render(
            request,
            state,
            "admin/password_reset.html",
            {"who": who, "password": password},
            principal=principal,
        )
    actions = {
        "disable": lambda: state.store.set_disabled(annotator_id, True),
        "enable": lambda: state.store.set_disabled(annotator_id, False),
        "make_admin": lambda: state.store.set_role(annotator_id, "admin"),
        "make_reviewer": lambda: state.store.set_role(annotator_id, "reviewer"),
        "make_annotator": lambda: state.store.set_role(annotator_id, "annotator"),
    }
    if action not in actions:
        raise CurationError(f"unknown action {action!r}; choose from {sorted(actions)}")
    actions[action]()
    back = "/admin/annotators" if where != "detail" else f"/admin/annotators/{annotator_id}"
    return RedirectResponse(back, status_code=303)


@router.get("/annotators/{annotator_id}")
def annotator_detail(
    *,
    request: Request,
    annotator_id: PathId,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    who = state.store.get_annotator(annotator_id)
    act = annotator_activity(state.store, annotator_id)
    top = max(act.per_day) or 1
    bars = [
        {"label": day_label(d), "count": c, "height": round(100 * c / top, 1)}
        for d, c in zip(act.days, act.per_day, strict=True)
    ]
    return render(
        request,
        state,
        "admin/annotator.html",
        {
            "who": who,
            "act": act,
            "bars": bars,
            "reputation_chart": line_chart([[i, r] for i, (_, r) in enumerate(act.reputation)]),
            "reviews": reviews_of(state.store, annotator_id, 20),
        },
        principal=principal,
    )


@router.get("/health")
def health(
    *,
    request: Request,
    principal: AdminPage,
    state: State,
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


# -- node dashboard (only with an attached node: create_app(..., node=view)) ---------------
NODE_PAGES = {
    "network": (
        "admin/node_network.html",
        "peer_joined,peer_left,round_decided,attack_detected,config_reloaded,node_stopping",
    ),
    "training": ("admin/node_training.html", "training_progress,round_decided,checkpoint_saved"),
    "annotation": (
        "admin/node_annotation.html",
        "annotation_replicated,task_finalised,round_decided",
    ),
}
CHART_W, CHART_H, CHART_PAD = 720.0, 200.0, 8.0


def line_chart(
    points: list[list[float]], width: float = CHART_W, height: float = CHART_H
) -> dict[str, Any]:
    """SVG geometry for a line chart of (x, y) points: a polyline and its axis labels.

    The y range is padded so a flat curve stays visible in the middle; x and y are scaled
    into the box independently. Non-finite points are skipped.
    """
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return {"points": "", "n": 0, "width": width, "height": height}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    span_x = (x1 - x0) or 1.0
    inner_w, inner_h = width - 2 * CHART_PAD, height - 2 * CHART_PAD

    def sx(x: float) -> float:
        return round(CHART_PAD + (x - x0) / span_x * inner_w, 1)

    def sy(y: float) -> float:
        return round(CHART_PAD + (y1 - y) / (y1 - y0) * inner_h, 1)

    return {
        "points": " ".join(f"{sx(x)},{sy(y)}" for x, y in pts),
        "n": len(pts),
        "width": width,
        "height": height,
        "x_min": x0,
        "x_max": x1,
        "y_min": round(y0, 4),
        "y_max": round(y1, 4),
        "last": [pts[-1][0], round(pts[-1][1], 4)],
        "last_xy": [sx(pts[-1][0]), sy(pts[-1][1])],
    }


def _node_view(request: Request) -> NodeDashboard:
    view: NodeDashboard | None = getattr(request.app.state, "node_view", None)
    if view is None:
        raise HTTPException(404, "no node is attached to this web app (start it with swarmlm node)")
    return view


def _event_line(kind: str, at: float, data: dict[str, Any]) -> dict[str, str]:
    """An event as the dashboard's log shows it (the same text dashboard.js builds)."""
    text = json.dumps(data, separators=(", ", ": "), default=str, sort_keys=True)
    return {
        "kind": kind,
        "when": time.strftime("%H:%M:%S", time.localtime(at)),
        "text": text if len(text) <= 200 else text[:199] + "…",
    }


def _series(rows: object, x: str, y: str) -> list[list[float]]:
    """(x, y) pairs from a list of dicts, skipping rows where either is missing."""
    out: list[list[float]] = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            vx, vy = row.get(x), row.get(y)
            if isinstance(vx, int | float) and isinstance(vy, int | float):
                out.append([float(vx), float(vy)])
    return out


def _node_context(page: str, view: NodeDashboard, state: AppState) -> dict[str, Any]:
    """What a dashboard page shows; runs in the threadpool (store and node reads block)."""
    m = view.metrics
    if page == "network":
        health = view.health()
        return {
            "net": view.network(),
            "components": health.get("components") or {},
            "overall": health.get("status", "down"),
            "rounds": m.rounds_feed(50),
            "reputation": sorted(m.reputation().items()),
        }
    if page == "training":
        tr = view.training()
        feed = m.training_feed()
        curve = tr.get("curve")
        train = _series(curve, "round", "train_loss") if curve else feed["round_train_loss"]
        val = _series(curve, "round", "val_loss") if curve else feed["round_val_loss"]
        return {
            "tr": tr,
            "feed": feed,
            "train_chart": line_chart(train),
            "val_chart": line_chart(val),
            "step_chart": line_chart(feed["loss_curve"]),
        }
    progress = [
        state.store.progress(ts.id, with_agreement=False) for ts in state.store.list_task_sets()
    ]
    stats = state.store.stats()
    return {
        "progress": progress,
        "stats": stats,
        "replicated": m.replicated_count,
        "finalised_here": m.finalised_count,
    }


@router.get("/node/{page}")
async def node_page(
    *,
    request: Request,
    page: Annotated[str, Path(pattern="^(network|training|annotation)$")],
    part: Annotated[str | None, Query(pattern="^live$")] = None,
    principal: AdminPage,
    state: State,
) -> HTMLResponse:
    """A dashboard page; ``?part=live`` returns only the region the page's script refreshes."""
    view = _node_view(request)
    template, kinds = NODE_PAGES[page]
    context = await run_in_threadpool(_node_context, page, view, state)
    recent = [_event_line(e.kind, e.time, e.data) for e in view.bus.recent(kinds.split(","), 30)]
    recent.reverse()
    context.update(page=page, kinds=kinds, recent=recent, live_only=part == "live")
    return render(request, state, template, context, principal=principal)
