"""Reading back: annotations of a set, progress and agreement, leaderboard, points, platform
counts and health."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import Integer as IntegerType
from sqlalchemy import and_, func, literal_column, select

from swarmlm.curation import quality
from swarmlm.curation.entities import (
    AnnotationRecord,
    AnnotatorInfo,
    TaskRecord,
    TaskSetProgress,
    _annotator_info,
    _aware,
)
from swarmlm.curation.models import (
    Annotation,
    Annotator,
    Assignment,
    PointsEntry,
    Task,
    TaskSet,
)
from swarmlm.curation.store_base import StoreBase

log = logging.getLogger(__name__)


class StatisticsStore(StoreBase):
    # -- reading back ---------------------------------------------------------------------
    def annotations(self, task_set_id: int) -> list[tuple[TaskRecord, AnnotationRecord]]:
        """Every annotation of a task set with its task, in task then submission order.

        Each task is read once and shared by its annotations (raw rows: through the ORM a
        100k x 3 set took ~25 s, parsing every task's JSON once per annotation).
        """
        with self.read_cursor() as (cur, sql):
            cur.execute(
                sql.q(f"SELECT {self._TASK_COLUMNS} FROM tasks WHERE task_set_id = ? ORDER BY id"),
                (task_set_id,),
            )
            tasks = {t.id: t for t in self._raw_task_records(cur, sql)}
            cur.execute(
                sql.q(
                    "SELECT a.id, a.task_id, a.annotator_id, n.public_id, a.value,"
                    " a.time_spent_ms, a.created_at_ms, a.signer_public_key, a.signature"
                    " FROM annotations a JOIN tasks t ON t.id = a.task_id"
                    " JOIN annotators n ON n.id = a.annotator_id"
                    " WHERE t.task_set_id = ? ORDER BY a.task_id, a.id"
                ),
                (task_set_id,),
            )
            out: list[tuple[TaskRecord, AnnotationRecord]] = []
            while rows := cur.fetchmany(5000):
                for r in rows:
                    task = tasks.get(int(r[1]))
                    if task is None:  # added after the first read: not in this export
                        continue
                    out.append(
                        (
                            task,
                            AnnotationRecord(
                                id=int(r[0]),
                                task_id=int(r[1]),
                                annotator_id=int(r[2]),
                                annotator_public_id=r[3],
                                value=sql.from_json(r[4]),
                                time_spent_ms=int(r[5]),
                                created_at_ms=int(r[6]),
                                signer_public_key=r[7],
                                signature=r[8],
                            ),
                        )
                    )
            return out

    def count_annotations(self, task_set_id: int | None = None) -> int:
        with self._read() as s:
            q = select(func.count()).select_from(Annotation)
            if task_set_id is not None:
                q = q.join(Task, Task.id == Annotation.task_id).where(
                    Task.task_set_id == task_set_id
                )
            return int(s.scalar(q) or 0)

    def progress(self, task_set_id: int, with_agreement: bool = True) -> TaskSetProgress:
        """Counts and agreement statistics of one task set (for the admin pages and API)."""
        info = self.get_task_set(task_set_id)
        now = self._clock()
        with self._read() as s:
            n_tasks, n_gold, n_final, n_ann, mean_agr = s.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(Task.is_gold.cast(IntegerType)), 0),
                    func.coalesce(func.sum((Task.status == "finalised").cast(IntegerType)), 0),
                    func.coalesce(func.sum(Task.n_annotations), 0),
                    func.avg(Task.agreement),
                ).where(Task.task_set_id == task_set_id)
            ).one()
            live = s.scalar(
                select(func.count())
                .select_from(Assignment)
                .join(Task, Task.id == Assignment.task_id)
                .where(
                    and_(
                        Task.task_set_id == task_set_id,
                        Assignment.state == "leased",
                        Assignment.expires_at > now,
                    )
                )
            )
        agreement: dict[str, float | None] = {}
        if with_agreement:
            pairs = self.annotations(task_set_id)
            agreement = quality.set_agreement(
                info.schema,
                [(t.id, a.annotator_id, a.value) for t, a in pairs if not t.is_gold],
            )
        return TaskSetProgress(
            task_set=info,
            n_tasks=int(n_tasks),
            n_gold=int(n_gold),
            n_finalised=int(n_final),
            n_annotations=int(n_ann),
            live_leases=int(live or 0),
            mean_task_agreement=None if mean_agr is None else float(mean_agr),
            agreement=agreement,
        )

    def leaderboard(self, limit: int = 20) -> list[AnnotatorInfo]:
        with self._read() as s:
            return [
                _annotator_info(a)
                for a in s.scalars(
                    select(Annotator)
                    .where(Annotator.disabled.is_(False))
                    .order_by(Annotator.points.desc(), Annotator.reputation.desc(), Annotator.id)
                    .limit(max(1, min(limit, 1000)))
                )
            ]

    def points_history(self, annotator_id: int, limit: int = 50) -> list[tuple[int, str, int]]:
        """Most recent ledger entries as ``(delta, reason, created unix seconds)``."""
        with self._read() as s:
            rows = s.execute(
                select(PointsEntry.delta, PointsEntry.reason, PointsEntry.created_at)
                .where(PointsEntry.annotator_id == annotator_id)
                .order_by(PointsEntry.id.desc())
                .limit(limit)
            ).all()
            return [(d, r, int(_aware(c).timestamp())) for d, r, c in rows]

    def annotator_progress(self, annotator_id: int) -> dict[int, int]:
        """Annotations submitted by the annotator, per task set id."""
        with self._read() as s:
            rows = s.execute(
                select(Task.task_set_id, func.count())
                .join(Annotation, Annotation.task_id == Task.id)
                .where(Annotation.annotator_id == annotator_id)
                .group_by(Task.task_set_id)
            ).all()
            return {int(ts): int(n) for ts, n in rows}

    def stats(self) -> dict[str, Any]:
        """Platform-wide counts (cheap: no agreement computation)."""
        day_ago_ms = int((self._clock() - timedelta(days=1)).timestamp() * 1000)
        with self._read() as s:
            n_annotators = s.scalar(select(func.count()).select_from(Annotator)) or 0
            n_task_sets = s.scalar(select(func.count()).select_from(TaskSet)) or 0
            n_tasks = s.scalar(select(func.count()).select_from(Task)) or 0
            n_final = (
                s.scalar(select(func.count()).select_from(Task).where(Task.status == "finalised"))
                or 0
            )
            n_ann = s.scalar(select(func.count()).select_from(Annotation)) or 0
            n_day = (
                s.scalar(
                    select(func.count())
                    .select_from(Annotation)
                    .where(Annotation.created_at_ms >= day_ago_ms)
                )
                or 0
            )
            hour = (Annotation.created_at_ms // literal_column("3600000")).label("hour")
            hourly = s.execute(
                select(hour, func.count())
                .where(Annotation.created_at_ms >= day_ago_ms)
                .group_by(hour)
            ).all()
        return {
            "annotators": int(n_annotators),
            "task_sets": int(n_task_sets),
            "tasks": int(n_tasks),
            "tasks_finalised": int(n_final),
            "annotations": int(n_ann),
            "annotations_last_24h": int(n_day),
            "annotations_per_hour": {int(h) * 3600: int(c) for h, c in hourly},
        }

    def health(self) -> dict[str, Any]:
        """Round-trips the database; raises when it is unreachable."""
        t0 = time.perf_counter()
        with self._read() as s:
            s.scalar(select(1))
        return {
            "database": self.engines.read.dialect.name,
            "db_latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            "signer": self.identity.public_key_bytes.hex(),
        }
