"""The curation store: accounts, task sets, task distribution, signed annotations, reputation.

:class:`CurationStore` is assembled from parts by concern, each a subclass of
``store_base.StoreBase`` (engines, writer, caches): ``accounts.AccountsStore`` (accounts,
credentials), ``statistics.StatisticsStore`` (reading back, progress, leaderboard),
``replication.ReplicationStore`` (every signed record, listeners, merges) and this module
(task sets, tasks, distribution, submissions, scoring). The value types live in
``entities`` and are re-exported here.

Every public method is one database transaction: it either commits whole or changes nothing,
and a method that returns has committed (so an acknowledged submission is never lost).
Methods return plain dataclasses, never ORM objects, so callers hold no session.

Distribution rules (see docs/curation.md):
- an annotator is offered a task at most once, whatever they did with it (one assignment row
  per task and annotator, enforced by a unique constraint);
- a task is offered while ``annotations + live leases < needed``; expired leases stop counting,
  so their slot goes to someone else; skipped tasks free their slot the same way;
- among eligible tasks the one with most annotations goes first (finish what was started);
- with probability ``gold_share`` an unseen gold (honeypot) task is offered instead;
- once a task has ``needed`` annotations its consensus is computed; it is finalised when the
  agreement reaches the task set's threshold, else ``needed`` grows by one up to
  ``max_annotations``, where it is finalised anyway.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from swarmlm.curation import quality
from swarmlm.curation.accounts import AccountsStore
from swarmlm.curation.db import RawSql, create_engines, migrate
from swarmlm.curation.entities import (
    _QUEUE_WINDOW,
    POINTS_FOR_AGREEMENT,
    POINTS_PER_ANNOTATION,
    ROLES,
    AnnotationRecord,
    AnnotatorInfo,
    LeasedTask,
    LocalChange,
    MergeResult,
    ScoreChange,
    SubmitResult,
    TaskInput,
    TaskRecord,
    TaskSetInfo,
    TaskSetProgress,
    _check_task_set_name,
    _check_time_spent,
    _rowcount,
    _score_agreement,
    _task_record,
    _task_set_info,
    utcnow,
)
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    LabelSchemaError,
    NotFoundError,
)
from swarmlm.curation.group_commit import WriteTx
from swarmlm.curation.label_config import LabelConfigStore
from swarmlm.curation.models import (
    OPEN_TASK_PREDICATE,
    LabelConfig,
    Task,
    TaskSet,
)
from swarmlm.curation.replica import (
    ReplicaRecord,
    annotation_record,
    definition_digest,
    make_record,
)
from swarmlm.curation.replication import (
    ReplicationStore,
)
from swarmlm.curation.schema import (
    LabelSchema,
    parse_schema,
    schema_to_dict,
    validate_task,
    validate_value,
)
from swarmlm.curation.signing import sign_record, signed_record, task_digest
from swarmlm.curation.statistics import StatisticsStore
from swarmlm.curation.task_set_settings import TaskSetSettings, record_body
from swarmlm.p2p.identity import NodeIdentity

log = logging.getLogger(__name__)


__all__ = [
    "POINTS_FOR_AGREEMENT",
    "POINTS_PER_ANNOTATION",
    "ROLES",
    "AnnotationRecord",
    "AnnotatorInfo",
    "CurationStore",
    "LeasedTask",
    "LocalChange",
    "MergeResult",
    "ScoreChange",
    "SubmitResult",
    "TaskInput",
    "TaskRecord",
    "TaskSetInfo",
    "TaskSetProgress",
    "TaskSetSettings",
    "utcnow",
]


class CurationStore(AccountsStore, StatisticsStore, LabelConfigStore, ReplicationStore):
    """Transactional access to the curation database.

    ``identity`` signs every accepted annotation and every replication record made here.
    ``rng`` decides gold mixing (seed it for reproducible tests). ``password_hasher``
    defaults to argon2id with argon2-cffi's recommended parameters; tests may pass a cheaper
    one.

    ``replicated=True`` (set by :class:`swarmlm.node.replication.CurationReplicator`) makes a
    task's consensus and finalisation a pure function of its annotation set: annotations
    sorted by record digest, every annotator weighted equally (reputations are per-node
    history, so weighting by them would let nodes disagree). Without it, consensus weighs
    annotators by their current reputation, as a single node always did.
    """

    @classmethod
    def open(
        cls,
        url: str,
        identity: NodeIdentity,
        *,
        run_migrations: bool = True,
        rng: random.Random | None = None,
        password_hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = utcnow,
        replicated: bool = False,
    ) -> CurationStore:
        """Open (and by default migrate to the newest schema) the store at ``url``."""
        engines = create_engines(url)
        if run_migrations:
            migrate(engines)
        return cls(
            engines,
            identity,
            rng=rng,
            password_hasher=password_hasher,
            clock=clock,
            replicated=replicated,
        )

    # -- task sets and tasks --------------------------------------------------------------
    def create_task_set(
        self,
        name: str,
        schema: Any,
        settings: TaskSetSettings | None = None,
        *,
        description: str = "",
        **setting_values: Any,
    ) -> TaskSetInfo:
        """Create a task set with ``settings``, or with the settings given as keywords
        (``k=2, gold_share=0.0``; the others take their defaults, ``max_annotations`` 2 * k).
        A bad or unknown setting is a :class:`CurationError` naming it."""
        if settings is not None and setting_values:
            raise CurationError("pass the settings as a TaskSetSettings or as keywords, not both")
        chosen = settings if settings is not None else TaskSetSettings.parse(setting_values)
        parsed = parse_schema(schema)
        name = name.strip()
        _check_task_set_name(name)
        record = make_record(
            self.identity,
            "task_set",
            record_body(name, description, schema_to_dict(parsed), chosen),
        )
        try:
            with self._write() as s:
                ts = TaskSet(
                    name=name,
                    description=description,
                    label_schema=schema_to_dict(parsed),
                    **chosen.model_dump(),
                    active=True,
                    created_at=self._clock(),
                    record_digest=definition_digest(record.body),
                    config_version=1,
                )
                s.add(ts)
                self._add_record_rows(s, [record])
                s.flush()
                s.add(
                    LabelConfig(
                        task_set_id=ts.id,
                        version=1,
                        label_schema=ts.label_schema,
                        record_digest=None,
                        created_at=ts.created_at,
                    )
                )
                s.flush()
                info = _task_set_info(ts)
        except IntegrityError as e:
            raise ConflictError(f"a task set named {name!r} already exists") from e
        self._notify([record])
        return info

    def get_task_set(self, task_set_id: int) -> TaskSetInfo:
        with self._read() as s:
            ts = s.get(TaskSet, task_set_id)
            if ts is None:
                raise NotFoundError(f"task set {task_set_id} does not exist")
            return _task_set_info(ts)

    def find_task_set(self, name: str) -> TaskSetInfo:
        with self._read() as s:
            ts = s.scalars(select(TaskSet).where(TaskSet.name == name)).one_or_none()
            if ts is None:
                raise NotFoundError(f"task set {name!r} does not exist")
            return _task_set_info(ts)

    def list_task_sets(self) -> list[TaskSetInfo]:
        with self._read() as s:
            return [_task_set_info(ts) for ts in s.scalars(select(TaskSet).order_by(TaskSet.id))]

    def set_description(self, task_set_id: int, description: str) -> None:
        """Change a task set's instructions (shown to annotators). Local to this node: the
        replicated definition keeps the text it was created with."""
        if len(description) > 5000:
            raise CurationError("instructions are longer than 5000 characters")
        with self._write() as s:
            n = _rowcount(
                s.execute(
                    update(TaskSet).where(TaskSet.id == task_set_id).values(description=description)
                )
            )
            if not n:
                raise NotFoundError(f"task set {task_set_id} does not exist")

    def set_task_set_active(self, task_set_id: int, active: bool) -> None:
        with self._write() as s:
            n = _rowcount(
                s.execute(update(TaskSet).where(TaskSet.id == task_set_id).values(active=active))
            )
            if not n:
                raise NotFoundError(f"task set {task_set_id} does not exist")

    def add_tasks(
        self,
        task_set_id: int,
        tasks: Iterable[TaskInput],
        source: str = "",
        *,
        dry_run: bool = False,
    ) -> int:
        """Validate all tasks, then insert them in one transaction; returns how many.

        Tasks without ``external_id`` get ``"<n>"`` (their position among the set's tasks).
        Nothing is inserted when any task is invalid; the error names its position.
        ``dry_run`` does everything, the database's uniqueness checks included, then rolls
        back: the import preview says exactly what the import would do.
        """
        ts_info = self.get_task_set(task_set_id)
        ts_digest = self._task_set_digest(task_set_id)
        prefer = self.task_preference
        where_prefix = f"{source}: " if source else ""
        rows: list[dict[str, Any]] = []
        now = self._clock()
        with self._write() as s:
            offset = s.scalar(
                select(func.count()).select_from(Task).where(Task.task_set_id == task_set_id)
            )
            seen: set[str] = set()
            for i, t in enumerate(tasks):
                where = f"{where_prefix}task {i + 1}"
                content, outputs, gold = validate_task(
                    ts_info.schema, t.content, t.outputs, t.gold, where=where
                )
                ext = t.external_id if t.external_id is not None else str((offset or 0) + i + 1)
                ext = str(ext)
                digest = task_digest(ext, content, outputs)
                if not 1 <= len(ext) <= 200:
                    raise LabelSchemaError(f"{where}: external id must be 1-200 characters")
                if ext in seen:
                    raise ConflictError(f"{where}: duplicate external id {ext!r} in this import")
                seen.add(ext)
                rows.append(
                    {
                        "task_set_id": task_set_id,
                        "external_id": ext,
                        "content": content,
                        "outputs": outputs,
                        "gold": gold,
                        "is_gold": gold is not None,
                        "digest": digest,
                        "preferred": 1 if prefer is None or prefer(digest) else 0,
                        "needed": ts_info.k,
                        "n_annotations": 0,
                        "status": "open",
                        "consensus": None,
                        "agreement": None,
                        "created_at": now,
                    }
                )
            records = [] if dry_run else self._task_batch_records(ts_info.name, ts_digest, rows)
            if rows:
                self._add_record_rows(s, records)
                try:
                    for start in range(0, len(rows), 5000):
                        s.execute(insert(Task), rows[start : start + 5000])
                except IntegrityError as e:
                    raise ConflictError(
                        f"{where_prefix}an external id already exists in task set {ts_info.name!r}"
                    ) from e
            if dry_run:
                s.rollback()
                return len(rows)
        log.info("added %d tasks to task set %s", len(rows), ts_info.name)
        self._notify(records)
        return len(rows)

    def get_task(self, task_id: int) -> TaskRecord:
        with self._read() as s:
            t = s.get(Task, task_id)
            if t is None:
                raise NotFoundError(f"task {task_id} does not exist")
            return _task_record(t)

    def list_tasks(self, task_set_id: int) -> list[TaskRecord]:
        with self.read_cursor() as (cur, sql):
            cur.execute(
                sql.q(f"SELECT {self._TASK_COLUMNS} FROM tasks WHERE task_set_id = ? ORDER BY id"),
                (task_set_id,),
            )
            return list(self._raw_task_records(cur, sql))

    # -- distribution ---------------------------------------------------------------------
    # Leases and submissions are the platform's hot path: they run as prepared DB-API SQL
    # (see RawSql) inside the group commit, a handful of index lookups each.
    def next_task(self, annotator_id: int, task_set_id: int) -> LeasedTask | None:
        """Lease the next task of ``task_set_id`` for the annotator, or ``None`` when done.

        An annotator already holding a live lease in this set gets that task again (so a page
        reload does not burn tasks).
        """
        return self._committer.run(
            lambda tx: self._next_task_tx(tx, annotator_id, task_set_id, self._clock())
        )

    async def next_task_async(self, annotator_id: int, task_set_id: int) -> LeasedTask | None:
        """:meth:`next_task` for an event loop (no thread waits on the commit)."""
        return await self._committer.run_async(
            lambda tx: self._next_task_tx(tx, annotator_id, task_set_id, self._clock())
        )

    def _next_task_tx(
        self, tx: WriteTx, annotator_id: int, task_set_id: int, now: datetime
    ) -> LeasedTask | None:
        sql = tx.sql
        now_db = sql.ts(now)
        self._sweep_expired_leases(tx, now_db)
        ts = tx.one(
            "SELECT name, active, gold_share, lease_seconds,"
            " (SELECT disabled FROM annotators WHERE id = ?),"
            " (SELECT a.task_id FROM assignments a JOIN tasks t ON t.id = a.task_id"
            "  WHERE a.annotator_id = ? AND a.state = 'leased' AND a.expires_at > ?"
            "  AND t.task_set_id = ? LIMIT 1)"
            " FROM task_sets WHERE id = ?",
            (annotator_id, annotator_id, now_db, task_set_id, task_set_id),
        )
        if ts is None:
            raise NotFoundError(f"task set {task_set_id} does not exist")
        name, active, gold_share, lease_seconds, disabled, held = ts
        if not active:
            raise ConflictError(f"task set {name!r} is closed")
        if disabled is None or disabled:
            raise AuthError(f"annotator {annotator_id} does not exist or is disabled")
        schema = self._schema(tx, task_set_id)
        if held is not None:
            row = tx.one(
                "SELECT t.external_id, t.content, t.outputs, a.expires_at"
                " FROM tasks t JOIN assignments a ON a.task_id = t.id"
                " WHERE t.id = ? AND a.annotator_id = ?",
                (held, annotator_id),
            )
            return self._leased(sql, held, task_set_id, row, schema)
        expires = now + timedelta(seconds=lease_seconds)
        claimed = None
        if gold_share > 0 and self._rng.random() < gold_share:
            claimed = self._claim_gold(tx, task_set_id, annotator_id)
        if claimed is None:
            claimed = self._claim_regular(tx, task_set_id, annotator_id)
        if claimed is None:
            return None
        task_id, ext, content, outputs = claimed
        try:
            tx.execute(
                "INSERT INTO assignments (task_id, annotator_id, state, leased_at, expires_at)"
                " VALUES (?, ?, 'leased', ?, ?)",
                (task_id, annotator_id, now_db, sql.ts(expires)),
            )
        except self._integrity_errors as e:  # the same annotator leasing twice at once
            raise ConflictError(
                f"annotator {annotator_id} asked for two tasks of task set {task_set_id} at "
                "once; retry"
            ) from e
        return self._leased(sql, task_id, task_set_id, (ext, content, outputs, expires), schema)

    @staticmethod
    def _leased(
        sql: RawSql, task_id: int, task_set_id: int, row: Any, schema: LabelSchema
    ) -> LeasedTask:
        ext, content, outputs, expires = row
        return LeasedTask(
            task_id=int(task_id),
            task_set_id=task_set_id,
            external_id=ext,
            content=sql.from_json(content),
            outputs=sql.from_json(outputs),
            expires_at=sql.from_ts(expires),
            schema=schema,
        )

    def _sweep_expired_leases(self, tx: WriteTx, now_db: Any) -> None:
        """Turn leases past their expiry into ``expired`` and give their slots back.

        Runs in every lease transaction, so an expired lease never blocks a slot; finding
        nothing to do is one probe of ``ix_assignments_leased_expiry``. On PostgreSQL a
        concurrent sweep waits for the row lock, re-checks ``state`` and skips the row.
        """
        expired = tx.execute(
            "UPDATE assignments SET state = 'expired'"
            " WHERE state = 'leased' AND expires_at <= ? RETURNING task_id",
            (now_db,),
        ).fetchall()
        for (task_id,) in expired:
            tx.execute("UPDATE tasks SET n_leased = n_leased - 1 WHERE id = ?", (task_id,))

    # The WHERE clause repeats models.OPEN_TASK_PREDICATE verbatim so that SQLite and
    # PostgreSQL walk the partial index ix_tasks_open backwards, in offer order: preferred
    # first, then most annotations (finish what was started), then oldest.
    _PICK_REGULAR = (
        "SELECT id FROM tasks WHERE task_set_id = ? AND is_gold = ? AND "
        + OPEN_TASK_PREDICATE
        + " AND NOT EXISTS (SELECT 1 FROM assignments"
        " WHERE assignments.task_id = tasks.id AND assignments.annotator_id = ?)"
        " ORDER BY preferred DESC, n_annotations DESC, id ASC LIMIT 1"
    )
    _CLAIM_REGULAR = (
        "UPDATE tasks SET n_leased = n_leased + 1 WHERE id = ? AND "
        + OPEN_TASK_PREDICATE
        + " RETURNING external_id, content, outputs"
    )

    def _claim_regular(
        self, tx: WriteTx, task_set_id: int, annotator_id: int
    ) -> tuple[int, str, Any, Any] | None:
        """Take a slot of the first eligible task: ``(id, external id, content, outputs)``.

        The UPDATE re-checks the free slot under the row lock: on SQLite write transactions
        are serial so it always holds; on PostgreSQL a concurrent lease of the last slot makes
        it match nothing (READ COMMITTED re-evaluates the WHERE clause on the locked row), and
        we pick again.
        """
        for _ in range(1000):
            row = tx.one(self._PICK_REGULAR, (task_set_id, False, annotator_id))
            if row is None:
                return None
            got = tx.one(self._CLAIM_REGULAR, (row[0],))
            if got is not None:
                return int(row[0]), got[0], got[1], got[2]
        raise ConflictError(f"task set {task_set_id}: too much contention for free slots; retry")

    def _claim_gold(
        self, tx: WriteTx, task_set_id: int, annotator_id: int
    ) -> tuple[int, str, Any, Any] | None:
        """A random gold task among the first unseen ones (gold tasks have no slot limit)."""
        candidates = tx.execute(
            "SELECT id FROM tasks WHERE task_set_id = ? AND is_gold = ? AND NOT EXISTS"
            " (SELECT 1 FROM assignments"
            "  WHERE assignments.task_id = tasks.id AND assignments.annotator_id = ?)"
            " ORDER BY id LIMIT ?",
            (task_set_id, True, annotator_id, _QUEUE_WINDOW),
        ).fetchall()
        if not candidates:
            return None
        task_id = int(self._rng.choice(candidates)[0])
        got = tx.one(
            "UPDATE tasks SET n_leased = n_leased + 1 WHERE id = ?"
            " RETURNING external_id, content, outputs",
            (task_id,),
        )
        return task_id, got[0], got[1], got[2]

    def _schema(self, tx: WriteTx, task_set_id: int) -> LabelSchema:
        """The task set's label schema in force (see :meth:`_schema_version`)."""
        return self._schema_version(tx, task_set_id)[0]

    def _schema_version(self, tx: WriteTx, task_set_id: int) -> tuple[LabelSchema, int, str | None]:
        """The label schema in force for the set, its config version and config digest.

        Parsed schemas are cached per ``(set, config_digest)``, and the digest is read in
        the caller's transaction: after a label config edit (made by any process) the next
        transaction of every process validates against the new schema.
        """
        row = tx.one(
            "SELECT config_version, config_digest, label_schema FROM task_sets WHERE id = ?",
            (task_set_id,),
        )
        if row is None:
            raise NotFoundError(f"task set {task_set_id} does not exist")
        key = (task_set_id, row[1])
        hit = self._schemas.get(key)
        if hit is None:
            hit = (parse_schema(tx.sql.from_json(row[2])), int(row[0]))
            self._cache_schema(key, hit)
        return hit[0], hit[1], row[1]

    def _config_schema(
        self, tx: WriteTx, task_set_id: int, config_digest: str | None
    ) -> tuple[LabelSchema, int] | None:
        """The schema and version of one held label config of the set (``None``: the one it
        was created with); ``None`` when that config is not held here."""
        key = (task_set_id, config_digest)
        hit = self._schemas.get(key)
        if hit is None:
            if config_digest is None:
                row = tx.one(
                    "SELECT label_schema, version FROM label_configs"
                    " WHERE task_set_id = ? AND version = 1",
                    (task_set_id,),
                )
            else:
                row = tx.one(
                    "SELECT label_schema, version FROM label_configs"
                    " WHERE task_set_id = ? AND record_digest = ?",
                    (task_set_id, config_digest),
                )
            if row is None:
                return None
            hit = (parse_schema(tx.sql.from_json(row[0])), int(row[1]))
            self._cache_schema(key, hit)
        return hit

    def _cache_schema(self, key: tuple[int, str | None], value: tuple[LabelSchema, int]) -> None:
        with self._cache_lock:
            if len(self._schemas) >= 4096:
                self._schemas.clear()
            self._schemas[key] = value

    def skip(self, annotator_id: int, task_id: int) -> None:
        """Give a leased task back; it is requeued for others, never offered to this annotator."""

        def tx_fn(tx: WriteTx) -> None:
            n = tx.execute(
                "UPDATE assignments SET state = 'skipped'"
                " WHERE task_id = ? AND annotator_id = ? AND state = 'leased'",
                (task_id, annotator_id),
            ).rowcount
            if not n:
                raise ConflictError(f"task {task_id} is not leased to annotator {annotator_id}")
            tx.execute("UPDATE tasks SET n_leased = n_leased - 1 WHERE id = ?", (task_id,))

        self._committer.run(tx_fn)

    def submit(
        self, annotator_id: int, task_id: int, value: Any, time_spent_ms: int
    ) -> SubmitResult:
        """Record, sign and score an annotation of a task leased to the annotator.

        Raises :class:`LabelSchemaError` for a value that does not fit the schema,
        :class:`ConflictError` without a live lease (expired, skipped or already submitted).
        """
        _check_time_spent(time_spent_ms)
        result, record, done = self._committer.run(
            lambda tx: self._submit_tx(tx, annotator_id, task_id, value, time_spent_ms)
        )
        self._notify([record], done)
        return result

    async def submit_async(
        self, annotator_id: int, task_id: int, value: Any, time_spent_ms: int
    ) -> SubmitResult:
        """:meth:`submit` for an event loop (no thread waits on the commit)."""
        _check_time_spent(time_spent_ms)
        result, record, done = await self._committer.run_async(
            lambda tx: self._submit_tx(tx, annotator_id, task_id, value, time_spent_ms)
        )
        self._notify([record], done)
        return result

    def _submit_tx(
        self, tx: WriteTx, annotator_id: int, task_id: int, value: Any, time_spent_ms: int
    ) -> tuple[SubmitResult, ReplicaRecord, list[tuple[str, str]]]:
        sql = tx.sql
        now = self._clock()
        row = tx.one(
            "SELECT a.id, a.state, a.expires_at, t.digest, t.is_gold, t.gold, t.status,"
            " t.task_set_id, n.public_id, n.disabled, s.name"
            " FROM assignments a JOIN tasks t ON t.id = a.task_id"
            " JOIN annotators n ON n.id = a.annotator_id"
            " JOIN task_sets s ON s.id = t.task_set_id"
            " WHERE a.task_id = ? AND a.annotator_id = ?",
            (task_id, annotator_id),
        )
        if row is None:
            if tx.one("SELECT id FROM tasks WHERE id = ?", (task_id,)) is None:
                raise NotFoundError(f"task {task_id} does not exist")
            raise ConflictError(f"task {task_id} is not leased to annotator {annotator_id}")
        (
            asg_id,
            state,
            expires,
            digest,
            is_gold,
            gold,
            status,
            ts_id,
            public_id,
            disabled,
            ts_name,
        ) = row
        if disabled:
            raise AuthError(f"annotator {annotator_id} is disabled")
        if state == "expired" or (state == "leased" and sql.from_ts(expires) <= now):
            raise ConflictError(f"the lease on task {task_id} expired; fetch a new task")
        if state != "leased":
            raise ConflictError(f"task {task_id} was already {state} by this annotator")
        schema, config_version, config_digest = self._schema_version(tx, ts_id)
        value = validate_value(schema, value)
        created_ms = int(now.timestamp() * 1000)
        record = signed_record(digest, public_id, value, time_spent_ms, created_ms)
        signer, signature = sign_record(self.identity, record)
        replica = annotation_record(
            self.identity, ts_name, record, signer, signature, label_config=config_digest
        )
        (ann_id,) = tx.one(
            "INSERT INTO annotations (task_id, annotator_id, value, time_spent_ms,"
            " created_at_ms, signer_public_key, signature, digest, config_version)"
            " VALUES (?, ?, ?json, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                task_id,
                annotator_id,
                sql.json(value),
                time_spent_ms,
                created_ms,
                signer,
                signature,
                replica.hex,
                config_version,
            ),
        )
        self._insert_record_tx(tx, replica, created_ms)
        tx.execute("UPDATE assignments SET state = 'submitted' WHERE id = ?", (asg_id,))
        # The row lock taken here orders concurrent submits of one task (PostgreSQL).
        n, needed = tx.one(
            "UPDATE tasks SET n_annotations = n_annotations + 1, n_leased = n_leased - 1"
            " WHERE id = ? RETURNING n_annotations, needed",
            (task_id,),
        )
        changes: dict[int, ScoreChange] = {annotator_id: ScoreChange()}
        changes[annotator_id].points.append((POINTS_PER_ANNOTATION, "annotation"))
        finalised = False
        if is_gold:
            correct = quality.agrees(schema, value, sql.from_json(gold))
            changes[annotator_id].gold = correct
            if correct:
                changes[annotator_id].points.append((POINTS_FOR_AGREEMENT, "gold correct"))
        elif self.replicated:
            finalised = self._settle_task(tx, task_id, ts_id, schema, changes)
        elif n >= needed and status == "open":
            finalised = self._maybe_finalise(tx, task_id, ts_id, n, schema, changes)
        self._apply_scores(tx, changes, task_id, now)
        result = SubmitResult(
            annotation_id=int(ann_id),
            task_id=task_id,
            finalised=finalised,
            points_awarded=sum(d for d, _ in changes[annotator_id].points),
            signature=signature,
        )
        done: list[tuple[str, str]] = []
        if finalised:
            (ext,) = tx.one("SELECT external_id FROM tasks WHERE id = ?", (task_id,))
            done.append((ts_name, ext))
        return result, replica, done

    # -- quality --------------------------------------------------------------------------
    def _apply_scores(
        self, tx: WriteTx, changes: dict[int, ScoreChange], task_id: int, now: datetime
    ) -> None:
        """Update annotators in ascending id order (a fixed lock order: no deadlocks)."""
        ledger: list[tuple[int, int, str, int, Any]] = []
        now_db = tx.sql.ts(now)
        for aid in sorted(changes):
            ch = changes[aid]
            delta = sum(d for d, _ in ch.points)
            if ch.gold is None and ch.agreed is None:
                tx.execute("UPDATE annotators SET points = points + ? WHERE id = ?", (delta, aid))
            else:
                gold_n = int(ch.gold is not None)
                agree_n = int(ch.agreed is not None)
                # The UPDATE's row lock (PostgreSQL) makes the read-modify-write atomic.
                gc, gt, ac, at = tx.one(
                    "UPDATE annotators SET points = points + ?,"
                    " gold_correct = gold_correct + ?, gold_total = gold_total + ?,"
                    " agree_count = agree_count + ?, agree_total = agree_total + ?"
                    " WHERE id = ? RETURNING gold_correct, gold_total, agree_count, agree_total",
                    (delta, int(bool(ch.gold)), gold_n, int(bool(ch.agreed)), agree_n, aid),
                )
                tx.execute(
                    "UPDATE annotators SET reputation = ? WHERE id = ?",
                    (quality.reputation_score(gc, gt, ac, at), aid),
                )
            ledger += [(aid, d, reason, task_id, now_db) for d, reason in ch.points]
        if ledger:
            tx.cur.executemany(
                tx.sql.q(
                    "INSERT INTO points_ledger (annotator_id, delta, reason, task_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                ledger,
            )

    def _maybe_finalise(
        self,
        tx: WriteTx,
        task_id: int,
        task_set_id: int,
        n_annotations: int,
        schema: LabelSchema,
        changes: dict[int, ScoreChange],
    ) -> bool:
        sql = tx.sql
        threshold, cap = tx.one(
            "SELECT agreement_threshold, max_annotations FROM task_sets WHERE id = ?",
            (task_set_id,),
        )
        rows = [
            (int(aid), sql.from_json(value), float(rep))
            for aid, value, rep in tx.execute(
                "SELECT a.annotator_id, a.value, n.reputation FROM annotations a"
                " JOIN annotators n ON n.id = a.annotator_id WHERE a.task_id = ? ORDER BY a.id",
                (task_id,),
            ).fetchall()
        ]
        result = quality.task_consensus(schema, [r[1] for r in rows], [r[2] for r in rows])
        enough = result.agreement is None or result.agreement >= threshold
        if not enough and n_annotations < cap:
            log.debug(
                "task %d agreement %.2f below %.2f: asking for annotation %d",
                task_id,
                result.agreement or 0.0,
                threshold,
                n_annotations + 1,
            )
            tx.execute(
                "UPDATE tasks SET consensus = ?json, agreement = ?, confidence = ?, needed = ?"
                " WHERE id = ?",
                (
                    sql.json(result.label),
                    result.agreement,
                    result.confidence,
                    n_annotations + 1,
                    task_id,
                ),
            )
            return False
        tx.execute(
            "UPDATE tasks SET consensus = ?json, agreement = ?, confidence = ?,"
            " status = 'finalised' WHERE id = ?",
            (sql.json(result.label), result.agreement, result.confidence, task_id),
        )
        if result.label is not None:
            _score_agreement(
                changes, schema, [(aid, value) for aid, value, _ in rows], result.label
            )
        return True
