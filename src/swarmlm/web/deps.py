"""Who is asking: session cookies, bearer tokens, roles and CSRF checks.

The dependencies are coroutines: FastAPI runs a plain ``def`` dependency in its threadpool,
and a thread hand-off per dependency per request cost more than the checks themselves.

Browsers authenticate with an HttpOnly, SameSite=Lax session cookie (Secure over TLS) and
must echo the session's CSRF token in every form post (``csrf_token`` field) or API write
(``X-CSRF-Token`` header). Scripts authenticate with ``Authorization: Bearer <token>`` and
need no CSRF token, since browsers never attach that header on their own. Anonymous forms
(login, register) use a double-submit cookie instead.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

from fastapi import Depends, HTTPException, Path, Request, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from swarmlm.curation.store import AnnotatorInfo, CurationStore
from swarmlm.web.security import RateLimiter
from swarmlm.web.settings import WebSettings

SESSION_COOKIE = "swarmlm_session"
ANON_CSRF_COOKIE = "swarmlm_csrf"
T = TypeVar("T")
CSRF_HEADER = "x-csrf-token"


@dataclass
class AppState:
    store: CurationStore
    settings: WebSettings
    templates: Jinja2Templates
    login_limiter: RateLimiter
    register_limiter: RateLimiter
    submit_limiter: RateLimiter
    # Below the PostgreSQL pool size (10): concurrent lookups beyond the pool open overflow
    # connections that are closed again on return, and a new pg8000 connection costs
    # milliseconds of CPU (measured: 90% of a PostgreSQL server's CPU went to that churn).
    lookups: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))


@dataclass(frozen=True)
class Principal:
    annotator: AnnotatorInfo
    via: Literal["session", "token"]
    csrf: str | None = None


class LoginRequiredError(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""


async def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.swarm
    return state


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _lookup(state: AppState, fn: Callable[[str], T], arg: str) -> T:
    """Run a credential lookup: inline on SQLite, in the threadpool otherwise.

    The lookup is a cached entry plus one primary-key read of the auth epoch; on a local
    SQLite file (WAL: readers never wait for writers) that read takes microseconds, less than
    handing the call to a thread and back. A network database gets the threadpool, at most
    ``AppState.lookups`` calls at a time.
    """
    if state.store.engines.is_sqlite:
        return fn(arg)
    async with state.lookups:
        return await run_in_threadpool(fn, arg)


async def optional_principal(
    *, request: Request, state: Annotated[AppState, Depends(app_state)]
) -> Principal | None:
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "Authorization header must be 'Bearer <token>'")
        info = await _lookup(state, state.store.annotator_for_token, token.strip())
        if info is None:
            raise HTTPException(401, "invalid or revoked API token")
        return Principal(info, "token")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        found = await _lookup(state, state.store.session_lookup, cookie)
        if found is not None:
            return Principal(found[0], "session", found[1])
    return None


async def api_user(
    *, principal: Annotated[Principal | None, Depends(optional_principal)]
) -> Principal:
    if principal is None:
        raise HTTPException(401, "authentication required (session cookie or bearer token)")
    return principal


async def api_admin(*, principal: Annotated[Principal, Depends(api_user)]) -> Principal:
    if not principal.annotator.is_admin:
        raise HTTPException(403, "administrator role required")
    return principal


async def api_write_user(
    *, request: Request, principal: Annotated[Principal, Depends(api_user)]
) -> Principal:
    """An API write: cookie-authenticated callers must send the CSRF header."""
    if principal.via == "session":
        sent = request.headers.get(CSRF_HEADER, "")
        if not principal.csrf or not hmac.compare_digest(sent, principal.csrf):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header")
    return principal


async def api_write_admin(*, principal: Annotated[Principal, Depends(api_write_user)]) -> Principal:
    if not principal.annotator.is_admin:
        raise HTTPException(403, "administrator role required")
    return principal


async def page_user(
    *, principal: Annotated[Principal | None, Depends(optional_principal)]
) -> Principal:
    if principal is None:
        raise LoginRequiredError()
    return principal


async def page_admin(*, principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    if not principal.annotator.is_admin:
        raise HTTPException(403, "administrator role required")
    return principal


async def page_reviewer(*, principal: Annotated[Principal, Depends(page_user)]) -> Principal:
    if not principal.annotator.can_review:
        raise HTTPException(403, "reviewer or administrator role required")
    return principal


async def api_write_reviewer(
    *, principal: Annotated[Principal, Depends(api_write_user)]
) -> Principal:
    if not principal.annotator.can_review:
        raise HTTPException(403, "reviewer or administrator role required")
    return principal


def check_form_csrf(principal: Principal, sent: str | None) -> None:
    if principal.via != "session" or not principal.csrf:
        raise HTTPException(403, "form posts need a browser session")
    if not sent or not hmac.compare_digest(str(sent), principal.csrf):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and retry")


def anon_csrf_token(request: Request) -> str:
    """Token for an anonymous form: the visitor's existing cookie value, or a new one."""
    return request.cookies.get(ANON_CSRF_COOKIE) or secrets.token_urlsafe(24)


def set_anon_csrf_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        ANON_CSRF_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def check_anon_csrf(request: Request, sent: str | None) -> None:
    cookie = request.cookies.get(ANON_CSRF_COOKIE)
    if not cookie or not sent or not hmac.compare_digest(str(sent), cookie):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and retry")


def set_session_cookie(request: Request, response: Response, token: str, ttl_s: int) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=ttl_s,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )


# -- what route signatures ask for ------------------------------------------------------------
# One spelling each, so every route states its access rule in a word.
State = Annotated[AppState, Depends(app_state)]
MaybeUser = Annotated[Principal | None, Depends(optional_principal)]
UserPage = Annotated[Principal, Depends(page_user)]
AdminPage = Annotated[Principal, Depends(page_admin)]
ReviewerPage = Annotated[Principal, Depends(page_reviewer)]
ApiUser = Annotated[Principal, Depends(api_user)]
ApiAdmin = Annotated[Principal, Depends(api_admin)]
ApiWriteUser = Annotated[Principal, Depends(api_write_user)]
ApiWriteAdmin = Annotated[Principal, Depends(api_write_admin)]
ApiWriteReviewer = Annotated[Principal, Depends(api_write_reviewer)]
#: a database id in a URL path
PathId = Annotated[int, Path(ge=1, le=2**31 - 1)]
