"""Application factory: middleware, routers, templates, error mapping."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
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
from swarmlm.web import admin, api, data_manager, label_config, pages, review
from swarmlm.web.deps import AppState, LoginRequiredError, api_admin
from swarmlm.web.node_view import NodeAttachment
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


def pretty_json(value: Any) -> str:
    """Indented JSON for display; a plain string, so Jinja still escapes it."""
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=False, default=str)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api") and request.url.path != "/openapi.json"


def open_store(settings: WebSettings) -> CurationStore:
    """Open (and migrate) the store named by the settings, signing with the node identity."""
    url = settings.db_url or default_db_url(settings.node_dir)
    return CurationStore.open(url, NodeIdentity.load_or_create(settings.node_dir))


def create_app(
    store: CurationStore, settings: WebSettings | None = None, node: NodeAttachment | None = None
) -> FastAPI:
    """The web app over ``store``. The caller owns the store (and closes it).

    With ``node`` (what a running integrated node hands over, see
    :mod:`swarmlm.web.node_view`), ``/api/health`` becomes the node's
    per-component health, ``/metrics`` is served, and the admin dashboard gains the
    network, training and annotation pages fed live by ``/api/events`` (admin only).
    """
    settings = settings or WebSettings()
    app = FastAPI(
        title="swarmlm human feedback",
        version="1",
        description="Annotation platform API: tasks, submissions, statistics, import/export.",
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.autoescape = True  # also for any non-.html template
    templates.env.filters["pretty_json"] = pretty_json
    minute = 60.0
    # Buckets live in each process: with N workers each gets 1/N of every limit, so the
    # total a client can get past all of them stays the configured one.
    share = 1.0 / settings.workers

    def limiter(rate: float, burst: float) -> RateLimiter:
        return RateLimiter(rate * share, max(1.0, burst * share), settings.rate_limit_keys)

    app.state.swarm = AppState(
        store=store,
        settings=settings,
        templates=templates,
        login_limiter=limiter(settings.login_per_minute / minute, settings.login_per_minute),
        register_limiter=limiter(
            settings.register_per_minute / minute, settings.register_per_minute
        ),
        submit_limiter=limiter(settings.submit_per_second, settings.submit_burst),
    )
    app.state.node_view = None
    api_router = api.router
    if node is not None:
        app.state.node_view = node.view
        node.install(app, [Depends(api_admin)])
        # The node's per-component /api/health replaces the database-only one.
        api_router = APIRouter()
        api_router.routes.extend(
            r for r in api.router.routes if getattr(r, "endpoint", None) is not api.health
        )
    app.include_router(api_router)
    app.include_router(data_manager.api)
    app.include_router(review.api)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(data_manager.pages)
    app.include_router(review.pages)
    app.include_router(label_config.pages)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        # Browsers ask for it on every first visit; an SVG icon saves a 404 per visitor.
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

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


SETTINGS_ENV = "SWARMLM_WEB_SETTINGS"


def app_from_environment() -> FastAPI:
    """App factory for uvicorn worker processes (``--workers N``).

    Each worker opens its own store (already migrated by the parent) from the settings in
    ``$SWARMLM_WEB_SETTINGS`` and closes it at shutdown. Workers share the database: SQLite
    in WAL mode serialises their write batches (``BEGIN IMMEDIATE`` with a busy timeout),
    PostgreSQL its row locks, and each worker acknowledges only what it has committed.
    """
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise RuntimeError(f"{SETTINGS_ENV} is not set: start workers through swarmlm.web.serve")
    settings = WebSettings.model_validate_json(raw)
    url = settings.db_url or default_db_url(settings.node_dir)
    store = CurationStore.open(
        url, NodeIdentity.load_or_create(settings.node_dir), run_migrations=False
    )
    app = create_app(store, settings)

    @asynccontextmanager
    async def close_store(_: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    app.router.lifespan_context = close_store
    return app


def serve(
    settings: WebSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
    access_log: bool = True,
    **uvicorn_options: Any,
) -> None:
    """Serve the app with uvicorn in ``settings.workers`` processes (blocks until stopped).

    One worker serves in this process. Several are started by uvicorn's supervisor from
    :func:`app_from_environment`, after this process has migrated the store and created the
    node identity once (so workers neither race on migrations nor sign with different keys).
    """
    import uvicorn

    store = open_store(settings)
    if settings.workers == 1:
        try:
            uvicorn.run(
                create_app(store, settings),
                host=host,
                port=port,
                log_level=log_level,
                access_log=access_log,
                **uvicorn_options,
            )
        finally:
            store.close()
        return
    store.close()
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    uvicorn.run(
        "swarmlm.web.app:app_from_environment",
        factory=True,
        workers=settings.workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        **uvicorn_options,
    )
