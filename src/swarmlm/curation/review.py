"""Review: reviewers (role ``reviewer``, or admins) accept, reject or correct annotations.

* **accept**: the annotation stands; it counts for its annotator like a correct gold answer.
* **reject**: the annotation is taken out of its task (value, signature and times stay in
  the review row), the task loses its consensus and reopens, so the slot is offered to
  someone else (never to the same annotator: their assignment row stays). The annotator
  loses the annotation's point and the verdict counts like a wrong gold answer.
* **correct**: the reviewer's value becomes the task's consensus (confidence 1, finalised);
  the annotation counts like a gold answer, right when it agrees with the correction.

Each annotation is reviewed at most once (``reviews.annotation_id`` is unique). Reviews
are local to the node that made them; the annotator sees them on the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from swarmlm.curation import quality
from swarmlm.curation.errors import AuthError, ConflictError, CurationError, NotFoundError
from swarmlm.curation.group_commit import WriteTx
from swarmlm.curation.schema import validate_value
from swarmlm.curation.store import POINTS_PER_ANNOTATION, CurationStore, ScoreChange

VERDICTS = ("accepted", "rejected", "corrected")


@dataclass(frozen=True)
class ReviewItem:
    """An annotation waiting for review, with what a reviewer needs to judge it."""

    annotation_id: int
    task_id: int
    task_set_id: int
    username: str
    value: Any
    content: Any
    outputs: list[str] | None
    consensus: Any
    agreement: float | None


@dataclass(frozen=True)
class ReviewRecord:
    id: int
    task_id: int
    task_set_id: int
    task_set: str
    external_id: str
    reviewer: str
    verdict: str
    value: Any
    corrected: Any
    comment: str
    created_at: datetime


def next_for_review(
    store: CurationStore, task_set_id: int, reviewer_id: int, skip: int = 0
) -> ReviewItem | None:
    """The next unreviewed annotation of the set not made by the reviewer: tasks with the
    lowest agreement first (where review helps most), then oldest. ``skip`` passes over
    that many (a reviewer's "later")."""
    store.get_task_set(task_set_id)
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT a.id, a.task_id, u.username, a.value, t.content, t.outputs,"
                " t.consensus, t.agreement FROM annotations a"
                " JOIN tasks t ON t.id = a.task_id JOIN annotators u ON u.id = a.annotator_id"
                " WHERE t.task_set_id = ? AND a.annotator_id <> ?"
                " AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.annotation_id = a.id)"
                " ORDER BY CASE WHEN t.agreement IS NULL THEN 1 ELSE 0 END, t.agreement, a.id"
                " LIMIT 1 OFFSET ?"
            ),
            (task_set_id, reviewer_id, max(0, skip)),
        )
        r = cur.fetchone()
    if r is None:
        return None
    return ReviewItem(
        annotation_id=int(r[0]),
        task_id=int(r[1]),
        task_set_id=task_set_id,
        username=r[2],
        value=sql.from_json(r[3]),
        content=sql.from_json(r[4]),
        outputs=sql.from_json(r[5]),
        consensus=sql.from_json(r[6]),
        agreement=r[7],
    )


def review_annotation(
    store: CurationStore,
    reviewer_id: int,
    annotation_id: int,
    verdict: str,
    *,
    corrected: Any = None,
    comment: str = "",
) -> int:
    """Record a verdict on an annotation and apply it (see the module docstring); returns
    the review id. Reviewers cannot review their own annotations."""
    if verdict not in VERDICTS:
        raise CurationError(f"verdict must be one of {list(VERDICTS)}, got {verdict!r}")
    if len(comment) > 2000:
        raise CurationError("comment is longer than 2000 characters")
    reviewer = store.get_annotator(reviewer_id)
    if not reviewer.can_review or reviewer.disabled:
        raise AuthError(f"{reviewer.username!r} may not review (role {reviewer.role})")

    def run(tx: WriteTx) -> int:
        sql = tx.sql
        row = tx.one(
            "SELECT a.task_id, a.annotator_id, a.value, t.task_set_id, t.is_gold, t.status"
            " FROM annotations a JOIN tasks t ON t.id = a.task_id WHERE a.id = ?",
            (annotation_id,),
        )
        if row is None:
            raise NotFoundError(f"annotation {annotation_id} does not exist")
        task_id, annotator_id, raw_value, task_set_id, is_gold, _status = row
        if int(annotator_id) == reviewer_id:
            raise ConflictError("reviewers cannot review their own annotations")
        if tx.one("SELECT 1 FROM reviews WHERE annotation_id = ?", (annotation_id,)):
            raise ConflictError(f"annotation {annotation_id} has already been reviewed")
        value = sql.from_json(raw_value)
        schema = store.get_task_set(int(task_set_id)).schema
        fixed = None
        if verdict == "corrected":
            fixed = validate_value(schema, corrected, field="corrected value")
        now = store.now()
        review_id = tx.one(
            "INSERT INTO reviews (task_id, annotation_id, annotator_id, reviewer_id, verdict,"
            " value, corrected, comment, created_at) VALUES (?, ?, ?, ?, ?, ?json, ?json, ?, ?)"
            " RETURNING id",
            (
                task_id,
                None if verdict == "rejected" else annotation_id,
                annotator_id,
                reviewer_id,
                verdict,
                sql.json(value),
                sql.json(fixed),
                comment,
                sql.ts(now),
            ),
        )[0]
        change = ScoreChange()
        if verdict == "accepted":
            change.gold = True
        elif verdict == "rejected":
            change.gold = False
            change.points.append((-POINTS_PER_ANNOTATION, "annotation rejected in review"))
            tx.execute("DELETE FROM annotations WHERE id = ?", (annotation_id,))
            tx.execute(
                "UPDATE tasks SET n_annotations = n_annotations - 1 WHERE id = ?", (task_id,)
            )
            if not is_gold:
                tx.execute(
                    "UPDATE tasks SET status = 'open', consensus = ?json, agreement = NULL,"
                    " confidence = NULL, needed = CASE WHEN needed > n_annotations THEN needed"
                    " ELSE n_annotations + 1 END WHERE id = ?",
                    (sql.json(None), task_id),
                )
        else:
            change.gold = quality.agrees(schema, value, fixed)
            values = [
                sql.from_json(v)
                for (v,) in tx.execute(
                    "SELECT value FROM annotations WHERE task_id = ?", (task_id,)
                ).fetchall()
            ]
            share = sum(quality.agrees(schema, v, fixed) for v in values) / max(1, len(values))
            if not is_gold:
                tx.execute(
                    "UPDATE tasks SET consensus = ?json, agreement = ?, confidence = 1.0,"
                    " status = 'finalised' WHERE id = ?",
                    (sql.json(fixed), share, task_id),
                )
        store.apply_score_changes(tx, {int(annotator_id): change}, int(task_id))
        return int(review_id)

    return store.run_write(run)


def reviews_of(store: CurationStore, annotator_id: int, limit: int = 20) -> list[ReviewRecord]:
    """The newest reviews of an annotator's work (what their dashboard shows)."""
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT r.id, r.task_id, t.task_set_id, s.name, t.external_id, w.username,"
                " r.verdict, r.value, r.corrected, r.comment, r.created_at FROM reviews r"
                " JOIN tasks t ON t.id = r.task_id JOIN task_sets s ON s.id = t.task_set_id"
                " JOIN annotators w ON w.id = r.reviewer_id"
                " WHERE r.annotator_id = ? ORDER BY r.id DESC LIMIT ?"
            ),
            (annotator_id, limit),
        )
        rows = cur.fetchall()
    return [
        ReviewRecord(
            id=int(r[0]),
            task_id=int(r[1]),
            task_set_id=int(r[2]),
            task_set=r[3],
            external_id=r[4],
            reviewer=r[5],
            verdict=r[6],
            value=sql.from_json(r[7]),
            corrected=sql.from_json(r[8]),
            comment=r[9],
            created_at=sql.from_ts(r[10]),
        )
        for r in rows
    ]


def review_counts(store: CurationStore, task_set_id: int) -> dict[str, int]:
    """Verdict -> count for a task set, plus ``pending`` (annotations never reviewed)."""
    with store.read_cursor() as (cur, sql):
        cur.execute(
            sql.q(
                "SELECT r.verdict, count(*) FROM reviews r JOIN tasks t ON t.id = r.task_id"
                " WHERE t.task_set_id = ? GROUP BY r.verdict"
            ),
            (task_set_id,),
        )
        out = {v: 0 for v in VERDICTS}
        out.update({str(v): int(n) for v, n in cur.fetchall()})
        cur.execute(
            sql.q(
                "SELECT count(*) FROM annotations a JOIN tasks t ON t.id = a.task_id"
                " WHERE t.task_set_id = ? AND NOT EXISTS"
                " (SELECT 1 FROM reviews r WHERE r.annotation_id = a.id)"
            ),
            (task_set_id,),
        )
        out["pending"] = int(cur.fetchone()[0])
    return out
