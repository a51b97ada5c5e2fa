"""Review pages (reviewers and admins) and the review API; annotators see the outcome on
their dashboard (``curation.review.reviews_of``).

The review page shows one annotation at a time, least-agreed tasks first; a verdict is a
form post with the CSRF token (keys ``A`` accept, ``R`` reject, ``C`` correct with the
chosen value, ``L`` later), answered with a redirect to the next one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from swarmlm.config import StrictModel
from swarmlm.curation import review as rv
from swarmlm.curation.schema import FreeTextSchema, LabelSchema, RankingSchema, RatingSchema
from swarmlm.web.api import USER_WRITE, error_responses
from swarmlm.web.data_manager import label_choices
from swarmlm.web.deps import (
    ApiWriteReviewer,
    PathId,
    ReviewerPage,
    State,
    check_form_csrf,
)
from swarmlm.web.pages import render

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api", tags=["review"])
Verdict = Literal["accepted", "rejected", "corrected"]


def parse_correction(schema: LabelSchema, raw: str | None) -> Any:
    """The posted correction in the schema's value format (the store validates it)."""
    if raw is None or not raw.strip():
        raise HTTPException(422, "choose the correct value before 'Correct'")
    raw = raw.strip()
    if isinstance(schema, RatingSchema):
        try:
            return int(raw)
        except ValueError as e:
            raise HTTPException(422, f"a rating is a whole number, got {raw[:20]!r}") from e
    if isinstance(schema, RankingSchema):
        try:
            return [int(x) - 1 for x in raw.replace(" ", "").split(",") if x]
        except ValueError as e:
            raise HTTPException(422, "a ranking lists response numbers, e.g. 2,1,3") from e
    if isinstance(schema, FreeTextSchema):
        return raw
    if schema.kind == "multiple_choice":
        return [c.strip() for c in raw.split(",") if c.strip()]
    return raw


@pages.get("/review")
async def review_index(
    *,
    request: Request,
    principal: ReviewerPage,
    state: State,
) -> HTMLResponse:
    sets = state.store.list_task_sets()
    counts = {ts.id: await run_in_threadpool(rv.review_counts, state.store, ts.id) for ts in sets}
    return render(
        request,
        state,
        "review_index.html",
        {"sets": sets, "counts": counts},
        principal=principal,
    )


@pages.get("/review/{task_set_id}")
async def review_page(
    *,
    request: Request,
    task_set_id: PathId,
    skip: Annotated[int, Query(ge=0, le=100_000)] = 0,
    principal: ReviewerPage,
    state: State,
) -> HTMLResponse:
    ts = state.store.get_task_set(task_set_id)
    item = await run_in_threadpool(
        rv.next_for_review, state.store, task_set_id, principal.annotator.id, skip
    )
    return render(
        request,
        state,
        "review.html",
        {
            "ts": ts,
            "item": item,
            "skip": skip,
            "labels": label_choices(ts.schema),
            "done": _verdict_or_none(request.query_params.get("done")),
            "error": None,
        },
        principal=principal,
    )


@pages.post("/review/{task_set_id}")
async def review_submit(
    *,
    request: Request,
    task_set_id: PathId,
    annotation_id: Annotated[int, Form(ge=1, le=2**31 - 1)],
    verdict: Annotated[str, Form(max_length=20)],
    corrected: Annotated[str | None, Form(max_length=10_000)] = None,
    comment: Annotated[str, Form(max_length=2000)] = "",
    back: Annotated[str | None, Form(max_length=20)] = None,
    csrf_token: Annotated[str | None, Form(max_length=200)] = None,
    principal: ReviewerPage,
    state: State,
) -> Response:
    check_form_csrf(principal, csrf_token)
    ts = state.store.get_task_set(task_set_id)
    value = parse_correction(ts.schema, corrected) if verdict == "corrected" else None
    await run_in_threadpool(
        lambda: rv.review_annotation(
            state.store,
            principal.annotator.id,
            annotation_id,
            verdict,
            corrected=value,
            comment=comment.strip(),
        )
    )
    if back and back.isdigit():
        return RedirectResponse(f"/admin/tasks/{int(back)}?reviewed={verdict}", status_code=303)
    return RedirectResponse(f"/review/{task_set_id}?done={verdict}", status_code=303)


def _verdict_or_none(raw: str | None) -> str | None:
    """A verdict echoed from the query string, only if it is one (no text from a link)."""
    return raw if raw in rv.VERDICTS else None


class ReviewIn(StrictModel):
    annotation_id: int = Field(ge=1, le=2**31 - 1)
    verdict: Verdict
    corrected: Any = Field(default=None, description="the right value, for 'corrected'")
    comment: str = Field(default="", max_length=2000)


class ReviewOut(BaseModel):
    review_id: int


@api.post("/reviews", status_code=201, responses=error_responses(*USER_WRITE, 404, 409))
async def post_review(
    *,
    body: ReviewIn,
    principal: ApiWriteReviewer,
    state: State,
) -> ReviewOut:
    """Accept, reject (the task is offered to someone else) or correct an annotation."""
    review_id = await run_in_threadpool(
        lambda: rv.review_annotation(
            state.store,
            principal.annotator.id,
            body.annotation_id,
            body.verdict,
            corrected=body.corrected,
            comment=body.comment,
        )
    )
    return ReviewOut(review_id=review_id)
