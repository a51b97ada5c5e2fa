"""SQLAlchemy 2.0 tables of the curation store. The Alembic migrations mirror this file.

Invariants the store keeps (and the database enforces where it can):
- one assignment row and at most one annotation per (task, annotator): nobody sees a task
  twice, whether they annotated it, skipped it or let the lease expire;
- ``Task.n_annotations`` equals the number of annotation rows of the task;
- ``Task.needed`` starts at the task set's ``k`` and only grows, up to ``max_annotations``;
- ``Task.n_leased`` equals the number of the task's assignments in state ``leased`` (a lease
  past its expiry stays ``leased`` until the next sweep turns it ``expired``);
- ``AuthEpoch.epoch`` grows whenever a credential or a role stops being valid (disable,
  role change, token revocation, logout), so every process drops its cached lookups.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Dialect-specific objects of the content search index (migration 0008), outside these
#: models: the SQLite FTS5 table (and its shadow tables) and the PostgreSQL trigram indexes.
SEARCH_INDEX_NAMES = ("tasks_search", "ix_tasks_content_trgm", "ix_tasks_external_id_trgm")

# A task with a free slot: open, and fewer annotations plus leases than it needs.
OPEN_TASK_PREDICATE = "status = 'open' AND needed > n_annotations + n_leased"


class Base(DeclarativeBase):
    pass


class AuthEpoch(Base):
    """One row (``id = 1``): a counter bumped by every revocation of access."""

    __tablename__ = "auth_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)


class Annotator(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    points: Mapped[int] = mapped_column(Integer, default=0)
    reputation: Mapped[float] = mapped_column(Float, default=0.5)
    gold_correct: Mapped[int] = mapped_column(Integer, default=0)
    gold_total: Mapped[int] = mapped_column(Integer, default=0)
    agree_count: Mapped[int] = mapped_column(Integer, default=0)
    agree_total: Mapped[int] = mapped_column(Integer, default=0)
    # replication: the record this account came from / was published as, and the public
    # key of the node it came from (NULL: created here)
    record_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    origin: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TaskSet(Base):
    __tablename__ = "task_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    label_schema: Mapped[dict[str, Any]] = mapped_column(JSON)
    k: Mapped[int] = mapped_column(Integer)
    max_annotations: Mapped[int] = mapped_column(Integer)
    agreement_threshold: Mapped[float] = mapped_column(Float)
    gold_share: Mapped[float] = mapped_column(Float)
    lease_seconds: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # content hash of the definition (replica.definition_digest): identical definitions
    # made on two nodes share it, so their tasks merge into one set
    record_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the label config in force (see LabelConfig): its version, and the digest of the
    # record it came from (NULL: still the schema the set was created with). Processes key
    # their parsed-schema cache by (set, config_digest). No Python-side default: inserts
    # written for older revisions (the migration tests) must not name the column.
    config_version: Mapped[int] = mapped_column(Integer, server_default="1")
    config_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)


class LabelConfig(Base):
    """One version of a task set's label schema (version 1: the schema it was created with).

    Later versions come from an edit (``label_config.py``) or a replicated ``label_config``
    record; ``record_digest`` names that record. Two nodes editing at once may both make a
    version n: the one in force is the highest version, ties to the smaller record digest.
    """

    __tablename__ = "label_configs"
    __table_args__ = (Index("ix_label_configs_set_version", "task_set_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_set_id: Mapped[int] = mapped_column(ForeignKey("task_sets.id"))
    version: Mapped[int] = mapped_column(Integer)
    label_schema: Mapped[dict[str, Any]] = mapped_column(JSON)
    record_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("task_set_id", "external_id", name="uq_tasks_set_external"),
        # The assignment queue: only tasks with a free slot are in this index, in the order
        # they are offered when walked backwards (preferred first, then most annotations,
        # then oldest: hence ``id DESC``), so picking one is a short index walk whatever the
        # number of tasks. Queries must repeat OPEN_TASK_PREDICATE verbatim for SQLite and
        # PostgreSQL to use it.
        Index(
            "ix_tasks_open",
            "task_set_id",
            "is_gold",
            "preferred",
            "n_annotations",
            literal_column("id").desc(),
            sqlite_where=text(OPEN_TASK_PREDICATE),
            postgresql_where=text(OPEN_TASK_PREDICATE),
        ),
        Index("ix_tasks_gold", "task_set_id", "is_gold", "id"),
        Index("ix_tasks_digest", "digest"),
        # the data manager's sorts and range filters (both change only at consensus time,
        # so they cost nothing on the lease and submit path)
        Index("ix_tasks_set_agreement", "task_set_id", "agreement"),
        Index("ix_tasks_set_confidence", "task_set_id", "confidence"),
        # the data manager's id and annotation-count sorts (n_annotations changes on each
        # submission: one more index entry to move, measured in the benchmark)
        Index("ix_tasks_set_id", "task_set_id", "id"),
        Index("ix_tasks_set_annotations", "task_set_id", "n_annotations"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_set_id: Mapped[int] = mapped_column(ForeignKey("task_sets.id"))
    external_id: Mapped[str] = mapped_column(String(200))
    content: Mapped[Any] = mapped_column(JSON)
    outputs: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    gold: Mapped[Any] = mapped_column(JSON, nullable=True)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    digest: Mapped[str] = mapped_column(String(64))
    needed: Mapped[int] = mapped_column(Integer)
    n_annotations: Mapped[int] = mapped_column(Integer, default=0)
    # assignments of this task in state "leased" (live or expired but not yet swept)
    n_leased: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16), default="open")
    consensus: Mapped[Any] = mapped_column(JSON, nullable=True)
    agreement: Mapped[float | None] = mapped_column(Float, nullable=True)
    # posterior of the consensus label (quality.TaskConsensus.confidence)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # replication: the signed batch record holding this task, and whether this node serves
    # it first (its rendezvous share; 1 for every task when not replicating)
    record_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    preferred: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_assignments_task_annotator"),
        Index("ix_assignments_task_state", "task_id", "state", "expires_at"),
        Index("ix_assignments_annotator_state", "annotator_id", "state"),
        # leases by expiry, for the sweep that returns expired slots to the queue
        Index(
            "ix_assignments_leased_expiry",
            "expires_at",
            sqlite_where=text("state = 'leased'"),
            postgresql_where=text("state = 'leased'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    state: Mapped[str] = mapped_column(String(16))  # leased | submitted | skipped | expired
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("task_id", "annotator_id", name="uq_annotations_task_annotator"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    value: Mapped[Any] = mapped_column(JSON)
    time_spent_ms: Mapped[int] = mapped_column(BigInteger)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    signer_public_key: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    # digest of the replicated record (order-independent consensus sorts by it)
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # the task set's label config version this value was validated against
    config_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class ReplicaRecordRow(Base):
    """A signed replication record exactly as it travels (see :mod:`..replica`)."""

    __tablename__ = "replica_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class Review(Base):
    """A reviewer's verdict on one annotation: accepted, rejected or corrected.

    A rejected annotation is taken out of its task (its value, signature and times are kept
    here) so the task asks someone else; a correction becomes the task's consensus. Either
    way the annotator's reputation counts the verdict like a gold answer.
    """

    __tablename__ = "reviews"
    __table_args__ = (
        Index("ix_reviews_annotator", "annotator_id", "id"),
        Index("ix_reviews_task", "task_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    # NULL once a rejection took the annotation out of the task
    annotation_id: Mapped[int | None] = mapped_column(
        ForeignKey("annotations.id", ondelete="SET NULL"), nullable=True, unique=True
    )
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    verdict: Mapped[str] = mapped_column(String(16))  # accepted | rejected | corrected
    value: Mapped[Any] = mapped_column(JSON)  # the annotation's value as reviewed
    corrected: Mapped[Any] = mapped_column(JSON, nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PointsEntry(Base):
    __tablename__ = "points_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
