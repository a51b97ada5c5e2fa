"""Application factory: middleware, routers, templates, error mapping."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from swarmlm.curation.db import default_db_url
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    ImportFormatError,
    LabelSchemaError,
    NotFoundError,
)
from swarmlm.curation.store import CurationStore
from swarmlm.p2p.identity import NodeIdentity
from swarmlm.web import admin, api, pages
from swarmlm.web.deps import AppState, LoginRequiredError
from swarmlm.web.security import BodySizeLimitMiddleware, RateLimiter, SecurityHeadersMiddleware
from swarmlm.web.settings import WebSettings

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

_STATUS: list[tuple[type[CurationError], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (AuthError, 403),
    (LabelSchemaError, 422),
    (ImportFormatError, 422),
    (CurationError, 400),
]


def _status_for(exc: CurationError) -> int:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 400  # pragma: no cover


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api") and request.url.path != "/openapi.json"


def open_store(settings: WebSettings) -> CurationStore:
    """Open (and migrate) the store named by the settings, signing with the node identity."""
    url = settings.db_url or default_db_url(settings.node_dir)
    return CurationStore.open(url, NodeIdentity.load_or_create(settings.node_dir))


def create_app(store: CurationStore, settings: WebSettings | None = None) -> FastAPI:
    """The web app over ``store``. The caller owns the store (and closes it)."""
    settings = settings or WebSettings()
    app = FastAPI(
        title="swarmlm human feedback",
        version="1",
        description="Annotation platform API: tasks, submissions, statistics, import/export.",
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.autoescape = True  # also for any non-.html template
    minute = 60.0
    app.state.swarm = AppState(
        store=store,
        settings=settings,
        templates=templates,
        login_limiter=RateLimiter(
            settings.login_per_minute / minute, settings.login_per_minute, settings.rate_limit_keys
        ),
        register_limiter=RateLimiter(
            settings.register_per_minute / minute,
            settings.register_per_minute,
            settings.rate_limit_keys,
        ),
        submit_limiter=RateLimiter(
            settings.submit_per_second, settings.submit_burst, settings.rate_limit_keys
        ),
    )
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def error_page(request: Request, status: int, detail: str) -> Response:
        if not _wants_html(request):
            return JSONResponse({"detail": detail}, status_code=status)
        state: AppState = request.app.state.swarm
        return state.templates.TemplateResponse(
            request,
            "error.html",
            {"status": status, "detail": detail, "user": None},
            status_code=status,
        )

    @app.exception_handler(LoginRequiredError)
    async def _login_required(request: Request, exc: LoginRequiredError) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(CurationError)
    async def _curation_error(request: Request, exc: CurationError) -> Response:
        return error_page(request, _status_for(exc), str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if _wants_html(request):
            resp = error_page(request, exc.status_code, str(exc.detail))
        else:
            resp = JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        if _wants_html(request):
            parts = [
                f"{'.'.join(str(x) for x in e['loc'][1:]) or 'request'}: {e['msg']}"
                for e in exc.errors()
            ]
            return error_page(request, 422, "; ".join(parts))
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware,
        limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
    )
    return app
