"""Value types the curation store hands out, and the helpers its parts share.

Callers get these plain dataclasses, never ORM objects, so they hold no session.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import Field

from swarmlm.curation import quality
from swarmlm.curation.errors import (
    CurationError,
)
from swarmlm.curation.models import (
    Annotator,
    Task,
    TaskSet,
)
from swarmlm.curation.replica import ReplicaRecord
from swarmlm.curation.schema import (
    LabelSchema,
    parse_schema,
)
from swarmlm.curation.task_set_settings import TaskSetSettings, settings_of

log = logging.getLogger(__name__)


ROLES: tuple[str, ...] = ("annotator", "reviewer", "admin")


T = TypeVar("T")
D = TypeVar("D")  # a dataclass type (copy_fields)
USERNAME_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
POINTS_PER_ANNOTATION = 1
POINTS_FOR_AGREEMENT = 2
_QUEUE_WINDOW = 64
_AUTH_CACHE_SIZE = 10_000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive; every stored datetime is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@dataclass
class ScoreChange:
    """Pending changes to one annotator within a submit transaction."""

    points: list[tuple[int, str]] = field(default_factory=list)
    gold: bool | None = None
    agreed: bool | None = None


def _score_agreement(
    changes: dict[int, ScoreChange], schema: Any, labels: list[tuple[int, Any]], label: Any
) -> None:
    """Mark who agreed with a finalised task's consensus and award their points."""
    for aid, value in labels:
        agreed = quality.agrees(schema, value, label)
        ch = changes.setdefault(aid, ScoreChange())
        ch.agreed = agreed
        if agreed:
            ch.points.append((POINTS_FOR_AGREEMENT, "agreed with consensus"))


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (``Result`` is typed without ``rowcount``)."""
    return int(result.rowcount)


def _check_time_spent(time_spent_ms: Any) -> None:
    if isinstance(time_spent_ms, bool) or not isinstance(time_spent_ms, int):
        raise CurationError("time_spent_ms must be an integer")
    if not 0 <= time_spent_ms <= 7 * 86400 * 1000:
        raise CurationError(f"time_spent_ms must be 0..604800000, got {time_spent_ms}")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_task_set_name(name: str) -> None:
    if not 1 <= len(name) <= 200:
        raise CurationError("task set name must be 1-200 characters")


@dataclass(frozen=True)
class AnnotatorInfo:
    id: int
    public_id: str
    username: str
    role: str
    disabled: bool
    points: int
    reputation: float
    gold_correct: int
    gold_total: int
    agree_count: int
    agree_total: int

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_review(self) -> bool:
        return self.role in ("reviewer", "admin")


class TaskSetInfo(TaskSetSettings):
    """A stored task set: its settings (inherited: one definition) plus what identifies it
    and the label schema in force. Built from the ORM row by :func:`_task_set_info` only;
    it is also the REST API's task set body (``GET /api/task-sets``)."""

    id: int
    name: str
    description: str
    label_schema: LabelSchema
    active: bool
    config_version: int = Field(
        default=1, description="version of the label configuration in force"
    )

    @property
    def schema(self) -> LabelSchema:  # type: ignore[override]
        """The label schema in force (``BaseModel.schema`` is pydantic's deprecated
        JSON-schema method; nothing here calls it)."""
        return self.label_schema

    @property
    def settings(self) -> TaskSetSettings:
        """Only the settings, e.g. to copy them to another set."""
        return settings_of(self)


@dataclass(frozen=True)
class TaskInput:
    """One task to add. ``gold`` makes it a honeypot with that known answer."""

    content: Any
    outputs: list[str] | None = None
    gold: Any = None
    external_id: str | None = None


@dataclass(frozen=True)
class LeasedTask:
    task_id: int
    task_set_id: int
    external_id: str
    content: Any
    outputs: list[str] | None
    expires_at: datetime
    schema: LabelSchema


@dataclass(frozen=True)
class SubmitResult:
    annotation_id: int
    task_id: int
    finalised: bool
    points_awarded: int
    signature: str


@dataclass(frozen=True)
class TaskRecord:
    id: int
    task_set_id: int
    external_id: str
    content: Any
    outputs: list[str] | None
    gold: Any
    is_gold: bool
    digest: str
    needed: int
    n_annotations: int
    status: str
    consensus: Any
    agreement: float | None


@dataclass(frozen=True)
class AnnotationRecord:
    id: int
    task_id: int
    annotator_id: int
    annotator_public_id: str
    value: Any
    time_spent_ms: int
    created_at_ms: int
    signer_public_key: str
    signature: str


@dataclass
class TaskSetProgress:
    task_set: TaskSetInfo
    n_tasks: int
    n_gold: int
    n_finalised: int
    n_annotations: int
    live_leases: int
    mean_task_agreement: float | None
    agreement: dict[str, float | None] = field(default_factory=dict)


def copy_fields(cls: type[D], source: Any, **overrides: Any) -> D:
    """An instance of the dataclass ``cls`` whose fields are read from ``source`` by name
    (an ORM row, another value type), except those given in ``overrides``."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: getattr(source, n) for n in names if n not in overrides}, **overrides)


def _annotator_info(a: Annotator) -> AnnotatorInfo:
    return copy_fields(AnnotatorInfo, a)


def _task_set_info(ts: TaskSet) -> TaskSetInfo:
    """The one conversion of a ``task_sets`` row: every field of :class:`TaskSetInfo` by
    name, not validated again (the row was validated when written; see
    :class:`TaskSetSettings` on the cap)."""
    values = {n: getattr(ts, n) for n in TaskSetInfo.model_fields}
    values["label_schema"] = parse_schema(ts.label_schema)
    return TaskSetInfo.model_construct(**values)


def _task_record(t: Task) -> TaskRecord:
    return copy_fields(TaskRecord, t)


@dataclass
class MergeResult:
    """What :meth:`CurationStore.merge_records` did with each record of a batch.

    ``accepted``: now held (new); ``duplicates``: already held; ``parked``: valid but
    waiting for a record they depend on (a task set, task or account not held yet);
    ``conflicts``: held, but not applied because a different record already claims the
    same name or slot (``(digest hex, why)``); ``invalid``: well-signed records that break
    the rules (``(record, why)``), not stored; ``finalised``: ``(task set name, external
    id)`` of tasks this batch finalised.
    """

    accepted: list[ReplicaRecord] = field(default_factory=list)
    duplicates: int = 0
    parked: list[ReplicaRecord] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[tuple[ReplicaRecord, str]] = field(default_factory=list)
    finalised: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class LocalChange:
    """What a committed local change gives store listeners: the signed records it made
    (to push to peers) and ``(task set name, external id)`` of tasks it finalised."""

    records: list[ReplicaRecord]
    finalised: list[tuple[str, str]] = field(default_factory=list)
