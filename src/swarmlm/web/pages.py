"""Annotator pages: register, log in, dashboard, annotate (keyboard driven), leaderboard.

Forms post back with the CSRF token and the app answers with a redirect (post/redirect/get),
so reloading never resubmits. Task content is only ever rendered through Jinja's
autoescaping, and the CSP forbids inline scripts, so nothing inside a task can execute.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from swarmlm.curation.errors import AuthError, CurationError
from swarmlm.curation.review import reviews_of
from swarmlm.curation.schema import (
    LabelSchema,
    MultipleChoiceSchema,
    RankingSchema,
    RatingSchema,
)
from swarmlm.web.deps import (
    SESSION_COOKIE,
    AppState,
    MaybeUser,
    PathId,
    Principal,
    State,
    UserPage,
    anon_csrf_token,
    check_anon_csrf,
    check_form_csrf,
    client_ip,
    set_anon_csrf_cookie,
    set_session_cookie,
)

router = APIRouter(include_in_schema=False)


def render(
    request: Request,
    state: AppState,
    name: str,
    context: dict[str, Any],
    status_code: int = 200,
    principal: Principal | None = None,
) -> HTMLResponse:
    ctx = {"user": principal.annotator if principal else None, "csrf": None, **context}
    if principal is not None and principal.via == "session":
        ctx["csrf"] = principal.csrf
    return state.templates.TemplateResponse(request, name, ctx, status_code=status_code)


def _anon_form(
    request: Request, state: AppState, name: str, error: str | None = None, status: int = 200
) -> HTMLResponse:
    token = anon_csrf_token(request)
    response = render(request, state, name, {"error": error, "anon_csrf": token}, status)
    set_anon_csrf_cookie(request, response, token)
    return response


@router.get("/")
def home(*, principal: MaybeUser) -> RedirectResponse:
    return RedirectResponse("/dashboard" if principal else "/login", status_code=303)


@router.get("/login")
def login_page(*, request: Request, state: State) -> HTMLResponse:
    return _anon_form(request, state, "login.html")


@router.post("/login")
def login_submit(
    *,
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    state: State,
) -> Response:
    check_anon_csrf(request, csrf_token)
    lim = state.login_limiter
    if not (lim.allow(f"ip:{client_ip(request)}") and lim.allow(f"user:{username}")):
        throttled = _anon_form(
            request, state, "login.html", "Too many attempts; wait a minute.", 429
        )
        throttled.headers["Retry-After"] = str(lim.retry_after())
        return throttled
    try:
        info = state.store.authenticate(username, password)
    except AuthError as e:
        return _anon_form(request, state, "login.html", str(e), 401)
    token, _ = state.store.create_session(info.id, state.settings.session_ttl_s)
    response = RedirectResponse("/dashboard", status_code=303)
    set_session_cookie(request, response, token, state.settings.session_ttl_s)
    return response


@router.get("/register")
def register_page(*, request: Request, state: State) -> HTMLResponse:
    if not state.settings.open_registration:
        raise HTTPException(403, "registration is closed on this node")
    return _anon_form(request, state, "register.html")


@router.post("/register")
def register_submit(
    *,
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    state: State,
) -> Response:
    check_anon_csrf(request, csrf_token)
    if not state.settings.open_registration:
        raise HTTPException(403, "registration is closed on this node")
    if not state.register_limiter.allow(f"ip:{client_ip(request)}"):
        throttled = _anon_form(request, state, "register.html", "Too many registrations.", 429)
        throttled.headers["Retry-After"] = str(state.register_limiter.retry_after())
        return throttled
    try:
        info = state.store.create_annotator(username, password)
    except CurationError as e:
        return _anon_form(request, state, "register.html", str(e), 422)
    token, _ = state.store.create_session(info.id, state.settings.session_ttl_s)
    response = RedirectResponse("/dashboard", status_code=303)
    set_session_cookie(request, response, token, state.settings.session_ttl_s)
    return response


@router.post("/logout")
def logout(
    *,
    request: Request,
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: UserPage,
    state: State,
) -> Response:
    check_form_csrf(principal, csrf_token)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        state.store.delete_session(cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/dashboard")
def dashboard(
    *,
    request: Request,
    principal: UserPage,
    state: State,
) -> HTMLResponse:
    me = state.store.get_annotator(principal.annotator.id)
    mine = state.store.annotator_progress(me.id)
    sets = []
    for ts in state.store.list_task_sets():
        if not ts.active:
            continue
        p = state.store.progress(ts.id, with_agreement=False)
        sets.append({"info": ts, "progress": p, "mine": mine.get(ts.id, 0)})
    return render(
        request,
        state,
        "dashboard.html",
        {
            "me": me,
            "sets": sets,
            "history": state.store.points_history(me.id, 10),
            "reviews": reviews_of(state.store, me.id, 10),
        },
        principal=principal,
    )


@router.get("/leaderboard")
def leaderboard(
    *,
    request: Request,
    principal: UserPage,
    state: State,
) -> HTMLResponse:
    return render(
        request,
        state,
        "leaderboard.html",
        {"rows": state.store.leaderboard(50)},
        principal=principal,
    )


@router.get("/annotate/{task_set_id}")
def annotate_page(
    *,
    request: Request,
    task_set_id: PathId,
    principal: UserPage,
    state: State,
) -> HTMLResponse:
    ts = state.store.get_task_set(task_set_id)
    task = state.store.next_task(principal.annotator.id, task_set_id)
    saved = request.query_params.get("saved")
    return render(
        request,
        state,
        "annotate.html",
        {"ts": ts, "task": task, "saved": saved, "error": None},
        principal=principal,
    )


def form_value(schema: LabelSchema, form: FormData) -> Any:
    """Turn the posted form fields into a label value (the store validates it)."""
    raw = [str(v) for v in form.getlist("value")]
    if isinstance(schema, MultipleChoiceSchema):
        return raw
    if not raw:
        raise CurationError("choose a label before submitting")
    if isinstance(schema, RatingSchema):
        try:
            return int(raw[0])
        except ValueError as e:
            raise CurationError(f"rating must be a whole number, got {raw[0]!r}") from e
    if isinstance(schema, RankingSchema):
        try:
            return [int(x) - 1 for x in raw[0].replace(" ", "").split(",") if x]
        except ValueError as e:
            raise CurationError("ranking must list response numbers, e.g. 2,1,3") from e
    return raw[0]


@router.post("/annotate/{task_set_id}")
async def annotate_submit(
    *,
    request: Request,
    task_set_id: PathId,
    principal: UserPage,
    state: State,
) -> Response:
    form = await request.form()
    check_form_csrf(principal, _field(form, "csrf_token"))
    try:
        task_id = int(_field(form, "task_id") or "")
        spent = min(max(int(_field(form, "time_spent_ms") or "0"), 0), 7 * 86400 * 1000)
    except ValueError as e:
        raise HTTPException(422, "task_id and time_spent_ms must be integers") from e
    ts = state.store.get_task_set(task_set_id)
    if _field(form, "action") == "skip":
        state.store.skip(principal.annotator.id, task_id)
        return RedirectResponse(f"/annotate/{task_set_id}?saved=skipped", status_code=303)
    if not state.submit_limiter.allow(f"a:{principal.annotator.id}"):
        raise HTTPException(429, "too many submissions; slow down")
    try:
        value = form_value(ts.schema, form)
        result = state.store.submit(principal.annotator.id, task_id, value, spent)
    except CurationError as e:
        task = state.store.next_task(principal.annotator.id, task_set_id)
        return render(
            request,
            state,
            "annotate.html",
            {"ts": ts, "task": task, "saved": None, "error": str(e)},
            status_code=422,
            principal=principal,
        )
    return RedirectResponse(
        f"/annotate/{task_set_id}?saved={result.points_awarded}", status_code=303
    )


def _field(form: FormData, name: str) -> str | None:
    v = form.get(name)
    return v if isinstance(v, str) else None
