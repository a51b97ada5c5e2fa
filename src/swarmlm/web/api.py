"""REST API under ``/api``, described by the OpenAPI schema at ``/openapi.json``.

Every body is a pydantic model with bounded fields; store errors map to HTTP statuses
(400 bad value, 401 unauthenticated, 403 forbidden, 404 unknown id, 409 conflicting state,
413 body too large, 422 invalid input, 429 rate limited). Each operation declares the
errors it can answer (``error_responses``), so generated clients and fuzzers know them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from swarmlm.config import StrictModel
from swarmlm.curation.errors import WrongCredentialsError
from swarmlm.curation.interchange import EXPORTERS, parse_tasks_text, serialize_export
from swarmlm.curation.schema import schema_to_dict
from swarmlm.curation.store import AnnotatorInfo, LeasedTask, TaskInput, TaskSetInfo
from swarmlm.curation.task_set_settings import TaskSetSettings, settings_of
from swarmlm.web.deps import (
    ApiAdmin,
    ApiUser,
    ApiWriteAdmin,
    ApiWriteUser,
    PathId,
    State,
    client_ip,
)

router = APIRouter(prefix="/api", tags=["api"])

DbId = Annotated[int, Field(ge=1, le=2**31 - 1)]
Username = Annotated[str, Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Password = Annotated[str, Field(min_length=8, max_length=1024)]
JsonValue = Any


class ErrorOut(BaseModel):
    """Every error body: ``detail`` is a message, or a list of field errors for 422."""

    detail: str | list[dict[str, Any]]


_ERROR_TEXT = {
    401: "Not authenticated: no, an invalid or a revoked credential",
    403: "Forbidden: wrong role, disabled account, closed registration or missing CSRF header",
    404: "Unknown id",
    409: "Conflicting state: expired lease, already submitted, duplicate name",
    413: "Request body over the size limit",
    422: "Invalid input; the message names the field",
    429: "Rate limited; retry after the Retry-After header's seconds",
    503: "Database unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an operation can answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorOut, "description": _ERROR_TEXT[code]}
        if code == 429:
            entry["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
            }
        out[code] = entry
    return out


# Every authenticated operation can answer 401; writes 403 (CSRF) and 413; reads by id 404.
USER_READ = (401, 403)
USER_WRITE = (401, 403, 413, 422)


class TaskOut(BaseModel):
    task_id: int
    task_set_id: int
    external_id: str
    content: JsonValue
    outputs: list[str] | None
    schema_: dict[str, Any] = Field(alias="schema")
    lease_expires_at: datetime

    model_config = ConfigDict(populate_by_name=True)

    @classmethod
    def of(cls, t: LeasedTask) -> TaskOut:
        return cls(
            task_id=t.task_id,
            task_set_id=t.task_set_id,
            external_id=t.external_id,
            content=t.content,
            outputs=t.outputs,
            schema=schema_to_dict(t.schema),
            lease_expires_at=t.expires_at,
        )


class NextTaskOut(BaseModel):
    task: TaskOut | None = Field(description="null when nothing is left for this annotator")


class SubmitIn(StrictModel):
    task_id: DbId
    value: JsonValue = Field(description="label value in the task set's schema format")
    time_spent_ms: int = Field(default=0, ge=0, le=7 * 86400 * 1000)


class SubmitOut(BaseModel):
    annotation_id: int
    task_id: int
    finalised: bool
    points_awarded: int
    signature: str


class SkipIn(StrictModel):
    task_id: DbId


class AnnotatorOut(BaseModel):
    id: int
    username: str
    role: str
    points: int
    reputation: float
    disabled: bool

    @classmethod
    def of(cls, a: AnnotatorInfo) -> AnnotatorOut:
        return cls.model_validate({**vars(a), "reputation": round(a.reputation, 4)})


class CredentialsIn(StrictModel):
    username: Username
    password: Password


class TokenOut(BaseModel):
    token: str
    annotator: AnnotatorOut


class TaskSetIn(TaskSetSettings):
    """A new task set: name, label schema and description here; its settings (names,
    defaults, bounds) are inherited from :class:`TaskSetSettings`, their one definition.
    Unknown fields are refused, as in every request body."""

    name: str = Field(min_length=1, max_length=200)
    label_schema: dict[str, Any] = Field(description='e.g. {"kind": "pairwise"}')
    description: str = Field(default="", max_length=5000)


class TaskIn(StrictModel):
    id: str | None = Field(default=None, min_length=1, max_length=200)
    content: JsonValue
    outputs: list[str] | None = Field(default=None, max_length=9)
    gold: JsonValue = None


class ImportIn(StrictModel):
    format: Literal["tasks", "jsonl", "label_studio", "csv"] = "tasks"
    tasks: list[TaskIn] | None = Field(default=None, max_length=200_000)
    text: str | None = Field(
        default=None, description="file content for jsonl / label_studio / csv"
    )
    outputs_keys: list[str] | None = Field(default=None, max_length=9)


class ImportOut(BaseModel):
    imported: int


class LabelConfigIn(StrictModel):
    label_schema: dict[str, Any] = Field(
        description='the new schema, of the same kind, e.g. {"kind": "single_choice", '
        '"choices": ["pos", "neg", "mixed"]}'
    )
    confirm: bool = Field(
        default=False,
        description="apply even though annotations use labels the new schema refuses (they "
        "stay stored but leave consensus); gold answers can never be invalidated",
    )
    dry_run: bool = Field(default=False, description="check and report, save nothing")
    expected_version: int | None = Field(
        default=None,
        ge=1,
        le=2**31 - 1,
        description="refuse with 409 if another version is in force (someone edited meanwhile)",
    )


class LabelUseOut(BaseModel):
    label: str
    annotations: int
    gold: int


class LabelConfigOut(BaseModel):
    task_set_id: int
    version: int = Field(description="the version in force after the call")
    label_schema: dict[str, Any]
    changed: bool = Field(description="the schema differs from the one that was in force")
    saved: bool = Field(description="a new version was written (false for a dry run)")
    invalidated: list[LabelUseOut] = Field(
        description="stored labels the new schema refuses, with how often they are used"
    )


class LabelConfigVersionOut(BaseModel):
    version: int
    label_schema: dict[str, Any]
    in_force: bool
    created_at: datetime
    annotations: int = Field(description="annotations validated against this version")
    record_digest: str | None = Field(description="the replicated record; null for version 1")


@router.get("/health", responses=error_responses(503))
def health(*, state: State) -> dict[str, Any]:
    """Liveness and database round-trip; 503 when the database is unreachable."""
    try:
        return {"status": "ok", **state.store.health()}
    except Exception as e:
        raise HTTPException(503, f"database unavailable: {type(e).__name__}") from e


@router.post("/register", status_code=201, responses=error_responses(403, 409, 413, 422, 429))
def register(*, body: CredentialsIn, request: Request, state: State) -> AnnotatorOut:
    if not state.settings.open_registration:
        raise HTTPException(403, "registration is closed on this node")
    if not state.register_limiter.allow(f"ip:{client_ip(request)}"):
        raise HTTPException(
            429,
            "too many registrations; retry later",
            headers={"Retry-After": str(state.register_limiter.retry_after())},
        )
    return AnnotatorOut.of(state.store.create_annotator(body.username, body.password))


@router.post("/login", responses=error_responses(401, 413, 422, 429))
def login(*, body: CredentialsIn, request: Request, state: State) -> TokenOut:
    """Exchange a username and password for a new API token (rate limited)."""
    lim = state.login_limiter
    if not (lim.allow(f"ip:{client_ip(request)}") and lim.allow(f"user:{body.username}")):
        raise HTTPException(
            429,
            "too many login attempts; retry later",
            headers={"Retry-After": str(lim.retry_after())},
        )
    try:
        info = state.store.authenticate(body.username, body.password)
    except WrongCredentialsError as e:
        # Wrong credentials are "not authenticated" (401), as the docs say, not forbidden.
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from e
    token = state.store.create_api_token(info.id, name="api login")
    return TokenOut(token=token, annotator=AnnotatorOut.of(info))


@router.post("/tokens", status_code=201, responses=error_responses(401, 403, 413))
def create_token(
    *,
    principal: ApiWriteUser,
    state: State,
) -> TokenOut:
    token = state.store.create_api_token(principal.annotator.id, name="created via api")
    return TokenOut(token=token, annotator=AnnotatorOut.of(principal.annotator))


@router.get("/me", responses=error_responses(*USER_READ))
def me(
    *,
    principal: ApiUser,
    state: State,
) -> AnnotatorOut:
    return AnnotatorOut.of(state.store.get_annotator(principal.annotator.id))


@router.get("/task-sets", responses=error_responses(*USER_READ))
def task_sets(*, _: ApiUser, state: State) -> list[TaskSetInfo]:
    return state.store.list_task_sets()


@router.post("/task-sets", status_code=201, responses=error_responses(*USER_WRITE, 409))
def create_task_set(
    *,
    body: TaskSetIn,
    _: ApiWriteAdmin,
    state: State,
) -> TaskSetInfo:
    return state.store.create_task_set(
        body.name, body.label_schema, settings_of(body), description=body.description
    )


# The two hot endpoints are coroutines: they await the group commit instead of holding a
# threadpool thread (and its hand-offs) per request.
@router.get("/tasks", responses=error_responses(*USER_READ, 404, 409, 422))
async def next_task(
    *,
    task_set_id: Annotated[int, Query(ge=1, le=2**31 - 1)],
    principal: ApiUser,
    state: State,
) -> NextTaskOut:
    """Lease the next task of a task set for the caller (the same one again while leased)."""
    t = await state.store.next_task_async(principal.annotator.id, task_set_id)
    return NextTaskOut(task=None if t is None else TaskOut.of(t))


@router.post("/submit", responses=error_responses(*USER_WRITE, 404, 409, 429))
async def submit(
    *,
    body: SubmitIn,
    principal: ApiWriteUser,
    state: State,
) -> SubmitOut:
    """Submit a label for a leased task; it is signed by this node before the reply."""
    if not state.submit_limiter.allow(f"a:{principal.annotator.id}"):
        raise HTTPException(
            429,
            "too many submissions; slow down",
            headers={"Retry-After": str(state.submit_limiter.retry_after())},
        )
    r = await state.store.submit_async(
        principal.annotator.id, body.task_id, body.value, body.time_spent_ms
    )
    return SubmitOut(
        annotation_id=r.annotation_id,
        task_id=r.task_id,
        finalised=r.finalised,
        points_awarded=r.points_awarded,
        signature=r.signature,
    )


@router.post("/skip", responses=error_responses(*USER_WRITE, 404, 409))
def skip(
    *,
    body: SkipIn,
    principal: ApiWriteUser,
    state: State,
) -> dict[str, bool]:
    state.store.skip(principal.annotator.id, body.task_id)
    return {"skipped": True}


@router.get("/stats", responses=error_responses(*USER_READ))
def stats(*, _: ApiUser, state: State) -> dict[str, Any]:
    """Platform counts, plus per task set progress."""
    out = state.store.stats()
    out["task_set_progress"] = [
        {
            "id": p.task_set.id,
            "name": p.task_set.name,
            "tasks": p.n_tasks,
            "finalised": p.n_finalised,
            "annotations": p.n_annotations,
            "live_leases": p.live_leases,
            "mean_task_agreement": p.mean_task_agreement,
        }
        for p in (
            state.store.progress(ts.id, with_agreement=False) for ts in state.store.list_task_sets()
        )
    ]
    return out


@router.get("/leaderboard", responses=error_responses(*USER_READ, 422))
def leaderboard(
    *,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    _: ApiUser,
    state: State,
) -> list[AnnotatorOut]:
    return [AnnotatorOut.of(a) for a in state.store.leaderboard(limit)]


@router.get("/task-sets/{task_set_id}/progress", responses=error_responses(*USER_READ, 404, 422))
def progress(
    *,
    task_set_id: PathId,
    _: ApiAdmin,
    state: State,
) -> dict[str, Any]:
    p = state.store.progress(task_set_id)
    return {
        "tasks": p.n_tasks,
        "gold": p.n_gold,
        "finalised": p.n_finalised,
        "annotations": p.n_annotations,
        "live_leases": p.live_leases,
        "mean_task_agreement": p.mean_task_agreement,
        "agreement": p.agreement,
    }


@router.post("/task-sets/{task_set_id}/import", responses=error_responses(*USER_WRITE, 404, 409))
def import_tasks(
    *,
    task_set_id: PathId,
    body: ImportIn,
    _: ApiWriteAdmin,
    state: State,
) -> ImportOut:
    """Import tasks as a JSON list, or as JSONL / Label Studio export text."""
    if body.format == "tasks":
        if body.tasks is None:
            raise HTTPException(422, "format 'tasks' needs the field 'tasks'")
        tasks = [
            TaskInput(content=t.content, outputs=t.outputs, gold=t.gold, external_id=t.id)
            for t in body.tasks
        ]
    else:
        if body.text is None:
            raise HTTPException(422, f"format {body.format!r} needs the field 'text'")
        tasks = parse_tasks_text(body.text, body.format, "request body", body.outputs_keys)
    return ImportOut(imported=state.store.add_tasks(task_set_id, tasks, source="api import"))


@router.put(
    "/task-sets/{task_set_id}/label-config",
    responses=error_responses(*USER_WRITE, 404, 409),
)
def update_label_config(
    *,
    task_set_id: PathId,
    body: LabelConfigIn,
    _: ApiWriteAdmin,
    state: State,
) -> LabelConfigOut:
    """Edit the task set's label configuration: a new version, replicated to peers.

    The kind (and a ranking's k) cannot change (422). A change that would make stored
    annotations invalid (a removed choice in use, a narrower rating scale) answers 409 naming
    the labels and counts unless ``confirm``; one that would invalidate a gold answer always
    answers 409. ``dry_run`` reports without saving; ``expected_version`` guards against a
    concurrent edit (409).
    """
    change = state.store.update_label_config(
        task_set_id,
        body.label_schema,
        confirm=body.confirm,
        dry_run=body.dry_run,
        expected_version=body.expected_version,
    )
    return LabelConfigOut(
        task_set_id=task_set_id,
        version=change.version,
        label_schema=schema_to_dict(change.schema),
        changed=change.changed,
        saved=change.saved,
        invalidated=[LabelUseOut.model_validate(vars(u)) for u in change.impact.invalidated],
    )


@router.get(
    "/task-sets/{task_set_id}/label-configs",
    responses=error_responses(*USER_READ, 404, 422),
)
def label_config_history(
    *,
    task_set_id: PathId,
    _: ApiAdmin,
    state: State,
) -> list[LabelConfigVersionOut]:
    """Every version of the task set's label configuration, newest first."""
    return [
        LabelConfigVersionOut.model_validate(
            {**vars(v), "label_schema": schema_to_dict(v.schema), "annotations": v.n_annotations}
        )
        for v in state.store.label_config_history(task_set_id)
    ]


@router.get(
    "/task-sets/{task_set_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one JSON object per line",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **error_responses(*USER_READ, 404, 422),
    },
)
def export(
    *,
    task_set_id: PathId,
    kind: Literal["annotations", "consensus", "preferences", "label_studio", "csv"] = "annotations",
    _: ApiAdmin,
    state: State,
) -> StreamingResponse:
    """Export a task set: signed annotations, per-task consensus or reward-model preferences
    (JSONL), Label Studio tasks with annotations and consensus (a JSON array), or one CSV
    row per task with its consensus label, agreement, confidence and annotations.

    Rows are streamed as they are read (a 100k-task set never sits in memory whole); the
    first row is read before the response starts, so a refused export (preferences of a
    set that is not pairwise or ranking) is still an error status, not a cut-off body.
    """
    ts = state.store.get_task_set(task_set_id)
    rows = iter(EXPORTERS[kind](state.store, task_set_id))
    first = next(rows, None)
    chained = rows if first is None else itertools.chain([first], rows)

    def chunks() -> Iterator[bytes]:
        pending: list[str] = []
        size = 0
        for text in serialize_export(kind, chained):
            pending.append(text)
            size += len(text)
            if size > 1 << 16:
                yield "".join(pending).encode()
                pending, size = [], 0
        yield "".join(pending).encode()

    media, ext = EXPORT_MEDIA[kind]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in ts.name)[:60]
    return StreamingResponse(
        chunks(),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{safe}-{kind}.{ext}"'},
    )


EXPORT_MEDIA = {
    "annotations": ("application/x-ndjson", "jsonl"),
    "consensus": ("application/x-ndjson", "jsonl"),
    "preferences": ("application/x-ndjson", "jsonl"),
    "label_studio": ("application/json", "json"),
    "csv": ("text/csv; charset=utf-8", "csv"),
}
