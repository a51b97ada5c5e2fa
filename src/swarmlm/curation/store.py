"""The curation store: accounts, task sets, task distribution, signed annotations, reputation.

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

import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Integer as IntegerType
from sqlalchemy import and_, delete, func, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swarmlm.curation import quality
from swarmlm.curation.db import Engines, create_engines, migrate
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    LabelSchemaError,
    NotFoundError,
)
from swarmlm.curation.group_commit import GroupCommitter
from swarmlm.curation.models import (
    Annotation,
    Annotator,
    ApiToken,
    Assignment,
    PointsEntry,
    Task,
    TaskSet,
    WebSession,
)
from swarmlm.curation.schema import (
    LabelSchema,
    parse_schema,
    schema_to_dict,
    validate_task,
    validate_value,
)
from swarmlm.curation.signing import sign_record, signed_record, task_digest
from swarmlm.p2p.identity import NodeIdentity

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("annotator", "admin")
USERNAME_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
POINTS_PER_ANNOTATION = 1
POINTS_FOR_AGREEMENT = 2
_QUEUE_WINDOW = 64


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    """SQLite hands datetimes back naive; every stored datetime is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


@dataclass
class _ScoreChange:
    """Pending changes to one annotator within a submit transaction."""

    points: list[tuple[int, str]] = field(default_factory=list)
    gold: bool | None = None
    agreed: bool | None = None


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (``Result`` is typed without ``rowcount``)."""
    return int(result.rowcount)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


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


@dataclass(frozen=True)
class TaskSetInfo:
    id: int
    name: str
    description: str
    schema: LabelSchema
    k: int
    max_annotations: int
    agreement_threshold: float
    gold_share: float
    lease_seconds: int
    active: bool


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


def _annotator_info(a: Annotator) -> AnnotatorInfo:
    return AnnotatorInfo(
        id=a.id,
        public_id=a.public_id,
        username=a.username,
        role=a.role,
        disabled=a.disabled,
        points=a.points,
        reputation=a.reputation,
        gold_correct=a.gold_correct,
        gold_total=a.gold_total,
        agree_count=a.agree_count,
        agree_total=a.agree_total,
    )


_ANNOTATOR_COLUMNS = (
    Annotator.id,
    Annotator.public_id,
    Annotator.username,
    Annotator.role,
    Annotator.disabled,
    Annotator.points,
    Annotator.reputation,
    Annotator.gold_correct,
    Annotator.gold_total,
    Annotator.agree_count,
    Annotator.agree_total,
)


def _task_set_info(ts: TaskSet) -> TaskSetInfo:
    return TaskSetInfo(
        id=ts.id,
        name=ts.name,
        description=ts.description,
        schema=parse_schema(ts.label_schema),
        k=ts.k,
        max_annotations=ts.max_annotations,
        agreement_threshold=ts.agreement_threshold,
        gold_share=ts.gold_share,
        lease_seconds=ts.lease_seconds,
        active=ts.active,
    )


def _task_record(t: Task) -> TaskRecord:
    return TaskRecord(
        id=t.id,
        task_set_id=t.task_set_id,
        external_id=t.external_id,
        content=t.content,
        outputs=t.outputs,
        gold=t.gold,
        is_gold=t.is_gold,
        digest=t.digest,
        needed=t.needed,
        n_annotations=t.n_annotations,
        status=t.status,
        consensus=t.consensus,
        agreement=t.agreement,
    )


class CurationStore:
    """Transactional access to the curation database.

    ``identity`` signs every accepted annotation. ``rng`` decides gold mixing (seed it for
    reproducible tests). ``password_hasher`` defaults to argon2id with argon2-cffi's
    recommended parameters; tests may pass a cheaper one.
    """

    def __init__(
        self,
        engines: Engines,
        identity: NodeIdentity,
        *,
        rng: random.Random | None = None,
        password_hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engines = engines
        self.identity = identity
        self._rng = rng or random.Random()
        self._hasher = password_hasher or PasswordHasher()
        self._clock = clock
        # Leases and submissions go through one writer thread that commits them in groups.
        self._committer = GroupCommitter(engines.write)

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
    ) -> CurationStore:
        """Open (and by default migrate to the newest schema) the store at ``url``."""
        engines = create_engines(url)
        if run_migrations:
            migrate(engines)
        return cls(engines, identity, rng=rng, password_hasher=password_hasher, clock=clock)

    def close(self) -> None:
        self._committer.close()
        self.engines.dispose()

    # -- sessions -------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self.engines.write, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engines.read, expire_on_commit=False) as s, s.begin():
            yield s

    # -- accounts -------------------------------------------------------------------------
    def create_annotator(
        self, username: str, password: str, role: str = "annotator"
    ) -> AnnotatorInfo:
        """Create an account; raises :class:`ConflictError` when the username is taken."""
        if not 3 <= len(username) <= 64 or not set(username) <= USERNAME_ALLOWED:
            raise CurationError(
                "username must be 3-64 characters of letters, digits, '_', '.' or '-'"
            )
        if not 8 <= len(password) <= 1024:
            raise CurationError("password must be 8-1024 characters")
        if role not in ROLES:
            raise CurationError(f"role must be one of {list(ROLES)}, got {role!r}")
        pw_hash = self._hasher.hash(password)
        try:
            with self._write() as s:
                a = Annotator(
                    public_id=secrets.token_hex(16),
                    username=username,
                    password_hash=pw_hash,
                    role=role,
                    disabled=False,
                    created_at=self._clock(),
                    points=0,
                    reputation=quality.reputation_score(0, 0, 0, 0),
                    gold_correct=0,
                    gold_total=0,
                    agree_count=0,
                    agree_total=0,
                )
                s.add(a)
                s.flush()
                return _annotator_info(a)
        except IntegrityError as e:
            raise ConflictError(f"username {username!r} is already taken") from e

    def authenticate(self, username: str, password: str) -> AnnotatorInfo:
        """Check a password; one error message for every failure, so it leaks nothing."""
        with self._read() as s:
            a = s.scalars(select(Annotator).where(Annotator.username == username)).one_or_none()
            stored = a.password_hash if a is not None else None
        if a is None or stored is None:
            # Spend the same time as a real check so usernames cannot be probed by timing.
            self._hasher.hash(password)
            raise AuthError("wrong username or password")
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError) as e:
            raise AuthError("wrong username or password") from e
        if a.disabled:
            raise AuthError(f"account {username!r} is disabled")
        if self._hasher.check_needs_rehash(stored):
            with self._write() as s:
                s.execute(
                    update(Annotator)
                    .where(Annotator.id == a.id)
                    .values(password_hash=self._hasher.hash(password))
                )
        return _annotator_info(a)

    def get_annotator(self, annotator_id: int) -> AnnotatorInfo:
        with self._read() as s:
            a = s.get(Annotator, annotator_id)
            if a is None:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            return _annotator_info(a)

    def find_annotator(self, username: str) -> AnnotatorInfo:
        with self._read() as s:
            a = s.scalars(select(Annotator).where(Annotator.username == username)).one_or_none()
            if a is None:
                raise NotFoundError(f"annotator {username!r} does not exist")
            return _annotator_info(a)

    def list_annotators(self) -> list[AnnotatorInfo]:
        with self._read() as s:
            return [_annotator_info(a) for a in s.scalars(select(Annotator).order_by(Annotator.id))]

    def set_role(self, annotator_id: int, role: str) -> None:
        if role not in ROLES:
            raise CurationError(f"role must be one of {list(ROLES)}, got {role!r}")
        with self._write() as s:
            n = _rowcount(
                s.execute(update(Annotator).where(Annotator.id == annotator_id).values(role=role))
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")

    def set_disabled(self, annotator_id: int, disabled: bool) -> None:
        """Disable (or re-enable) an account; disabling also ends its web sessions."""
        with self._write() as s:
            n = _rowcount(
                s.execute(
                    update(Annotator).where(Annotator.id == annotator_id).values(disabled=disabled)
                )
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            if disabled:
                s.execute(delete(WebSession).where(WebSession.annotator_id == annotator_id))

    def create_api_token(self, annotator_id: int, name: str = "script") -> str:
        """A new bearer token for scripts; only its SHA-256 is stored, so show it once."""
        token = "slm_" + secrets.token_urlsafe(32)
        with self._write() as s:
            if s.get(Annotator, annotator_id) is None:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            s.add(
                ApiToken(
                    annotator_id=annotator_id,
                    token_hash=_hash_token(token),
                    name=name[:100],
                    created_at=self._clock(),
                )
            )
        return token

    def revoke_api_tokens(self, annotator_id: int) -> int:
        with self._write() as s:
            return _rowcount(
                s.execute(delete(ApiToken).where(ApiToken.annotator_id == annotator_id))
            )

    def annotator_for_token(self, token: str) -> AnnotatorInfo | None:
        """The enabled account owning ``token``, or ``None`` (checked on every API call)."""
        with self.engines.read.connect() as conn:
            row = conn.execute(
                select(*_ANNOTATOR_COLUMNS)
                .join(ApiToken, ApiToken.annotator_id == Annotator.id)
                .where(ApiToken.token_hash == _hash_token(token))
            ).one_or_none()
            conn.rollback()
        if row is None or row.disabled:
            return None
        return AnnotatorInfo(**row._asdict())

    def create_session(self, annotator_id: int, ttl_seconds: int) -> tuple[str, str]:
        """Start a web session; returns ``(session token, CSRF token)``."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock()
        with self._write() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at < now))
            s.add(
                WebSession(
                    token_hash=_hash_token(token),
                    annotator_id=annotator_id,
                    csrf_token=csrf,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
        return token, csrf

    def session_lookup(self, token: str) -> tuple[AnnotatorInfo, str] | None:
        """``(annotator, csrf token)`` for a live session of an enabled account, else ``None``."""
        with self._read() as s:
            row = s.execute(
                select(Annotator, WebSession.csrf_token, WebSession.expires_at)
                .join(WebSession, WebSession.annotator_id == Annotator.id)
                .where(WebSession.token_hash == _hash_token(token))
            ).one_or_none()
            if row is None:
                return None
            a, csrf, expires = row
            if a.disabled or _aware(expires) < self._clock():
                return None
            return _annotator_info(a), csrf

    def delete_session(self, token: str) -> None:
        with self._write() as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == _hash_token(token)))

    # -- task sets and tasks --------------------------------------------------------------
    def create_task_set(
        self,
        name: str,
        schema: Any,
        *,
        k: int = 3,
        max_annotations: int | None = None,
        agreement_threshold: float = 0.6,
        gold_share: float = 0.1,
        lease_seconds: int = 600,
        description: str = "",
    ) -> TaskSetInfo:
        """Create a task set. ``max_annotations`` defaults to ``2 * k``."""
        parsed = parse_schema(schema)
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise CurationError("task set name must be 1-200 characters")
        if not 1 <= k <= 100:
            raise CurationError(f"k must be between 1 and 100, got {k}")
        cap = 2 * k if max_annotations is None else max_annotations
        if not k <= cap <= 1000:
            raise CurationError(f"max_annotations must be between k={k} and 1000, got {cap}")
        if not 0.0 <= agreement_threshold <= 1.0:
            raise CurationError(f"agreement_threshold must be in [0, 1], got {agreement_threshold}")
        if not 0.0 <= gold_share <= 1.0:
            raise CurationError(f"gold_share must be in [0, 1], got {gold_share}")
        if not 10 <= lease_seconds <= 7 * 86400:
            raise CurationError(f"lease_seconds must be 10..604800, got {lease_seconds}")
        try:
            with self._write() as s:
                ts = TaskSet(
                    name=name,
                    description=description,
                    label_schema=schema_to_dict(parsed),
                    k=k,
                    max_annotations=cap,
                    agreement_threshold=agreement_threshold,
                    gold_share=gold_share,
                    lease_seconds=lease_seconds,
                    active=True,
                    created_at=self._clock(),
                )
                s.add(ts)
                s.flush()
                return _task_set_info(ts)
        except IntegrityError as e:
            raise ConflictError(f"a task set named {name!r} already exists") from e

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

    def set_task_set_active(self, task_set_id: int, active: bool) -> None:
        with self._write() as s:
            n = _rowcount(
                s.execute(update(TaskSet).where(TaskSet.id == task_set_id).values(active=active))
            )
            if not n:
                raise NotFoundError(f"task set {task_set_id} does not exist")

    def add_tasks(self, task_set_id: int, tasks: Iterable[TaskInput], source: str = "") -> int:
        """Validate all tasks, then insert them in one transaction; returns how many.

        Tasks without ``external_id`` get ``"<n>"`` (their position among the set's tasks).
        Nothing is inserted when any task is invalid; the error names its position.
        """
        ts_info = self.get_task_set(task_set_id)
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
                        "digest": task_digest(ext, content, outputs),
                        "needed": ts_info.k,
                        "n_annotations": 0,
                        "status": "open",
                        "consensus": None,
                        "agreement": None,
                        "created_at": now,
                    }
                )
            if rows:
                try:
                    for start in range(0, len(rows), 5000):
                        s.execute(insert(Task), rows[start : start + 5000])
                except IntegrityError as e:
                    raise ConflictError(
                        f"{where_prefix}an external id already exists in task set {ts_info.name!r}"
                    ) from e
        log.info("added %d tasks to task set %s", len(rows), ts_info.name)
        return len(rows)

    def get_task(self, task_id: int) -> TaskRecord:
        with self._read() as s:
            t = s.get(Task, task_id)
            if t is None:
                raise NotFoundError(f"task {task_id} does not exist")
            return _task_record(t)

    def list_tasks(self, task_set_id: int) -> list[TaskRecord]:
        with self._read() as s:
            return [
                _task_record(t)
                for t in s.scalars(
                    select(Task).where(Task.task_set_id == task_set_id).order_by(Task.id)
                )
            ]

    # -- distribution ---------------------------------------------------------------------
    def next_task(self, annotator_id: int, task_set_id: int) -> LeasedTask | None:
        """Lease the next task of ``task_set_id`` for the annotator, or ``None`` when done.

        An annotator already holding a live lease in this set gets that task again (so a page
        reload does not burn tasks).
        """
        return self._committer.run(
            lambda s: self._next_task_tx(s, annotator_id, task_set_id, self._clock())
        )

    def _next_task_tx(
        self, s: Session, annotator_id: int, task_set_id: int, now: datetime
    ) -> LeasedTask | None:
        ts = s.execute(
            select(
                TaskSet.name,
                TaskSet.active,
                TaskSet.label_schema,
                TaskSet.gold_share,
                TaskSet.lease_seconds,
            ).where(TaskSet.id == task_set_id)
        ).one_or_none()
        if ts is None:
            raise NotFoundError(f"task set {task_set_id} does not exist")
        name, active, raw_schema, gold_share, lease_seconds = ts
        if not active:
            raise ConflictError(f"task set {name!r} is closed")
        disabled = s.scalar(select(Annotator.disabled).where(Annotator.id == annotator_id))
        if disabled is None or disabled:
            raise AuthError(f"annotator {annotator_id} does not exist or is disabled")
        schema = parse_schema(raw_schema)
        held = s.execute(
            select(Assignment.task_id, Assignment.expires_at)
            .join(Task, Task.id == Assignment.task_id)
            .where(
                Assignment.annotator_id == annotator_id,
                Assignment.state == "leased",
                Assignment.expires_at > now,
                Task.task_set_id == task_set_id,
            )
            .limit(1)
        ).one_or_none()
        if held is not None:
            return self._leased(s, held[0], _aware(held[1]), schema)
        task_id: int | None = None
        if gold_share > 0 and self._rng.random() < gold_share:
            task_id = self._pick_gold(s, task_set_id, annotator_id)
        if task_id is None:
            task_id = self._pick_regular(s, task_set_id, annotator_id, now)
        if task_id is None:
            return None
        expires = now + timedelta(seconds=lease_seconds)
        s.execute(
            insert(Assignment).values(
                task_id=task_id,
                annotator_id=annotator_id,
                state="leased",
                leased_at=now,
                expires_at=expires,
            )
        )
        return self._leased(s, task_id, expires, schema)

    @staticmethod
    def _leased(s: Session, task_id: int, expires: datetime, schema: LabelSchema) -> LeasedTask:
        row = s.execute(
            select(Task.task_set_id, Task.external_id, Task.content, Task.outputs).where(
                Task.id == task_id
            )
        ).one()
        return LeasedTask(
            task_id=task_id,
            task_set_id=row[0],
            external_id=row[1],
            content=row[2],
            outputs=row[3],
            expires_at=expires,
            schema=schema,
        )

    @staticmethod
    def _not_seen_by(annotator_id: int) -> Any:
        seen = (
            select(Assignment.id)
            .where(Assignment.task_id == Task.id, Assignment.annotator_id == annotator_id)
            .exists()
        )
        return ~seen

    def _pick_gold(self, s: Session, task_set_id: int, annotator_id: int) -> int | None:
        candidates = list(
            s.scalars(
                select(Task.id)
                .where(
                    Task.task_set_id == task_set_id,
                    Task.is_gold.is_(True),
                    self._not_seen_by(annotator_id),
                )
                .order_by(Task.id)
                .limit(_QUEUE_WINDOW)
            )
        )
        return self._rng.choice(candidates) if candidates else None

    def _pick_regular(
        self, s: Session, task_set_id: int, annotator_id: int, now: datetime
    ) -> int | None:
        offset = 0
        while True:
            window = s.execute(
                select(Task.id, Task.n_annotations, Task.needed)
                .where(
                    Task.task_set_id == task_set_id,
                    Task.is_gold.is_(False),
                    Task.status == "open",
                    self._not_seen_by(annotator_id),
                )
                .order_by(Task.n_annotations.desc(), Task.id.desc())
                .offset(offset)
                .limit(_QUEUE_WINDOW)
            ).all()
            if not window:
                return None
            live = dict(
                s.execute(
                    select(Assignment.task_id, func.count())
                    .where(
                        Assignment.task_id.in_([row[0] for row in window]),
                        Assignment.state == "leased",
                        Assignment.expires_at > now,
                    )
                    .group_by(Assignment.task_id)
                ).all()
            )
            for task_id, n, needed in window:
                if n + live.get(task_id, 0) < needed and self._claim(s, task_id, now):
                    return int(task_id)
            offset += _QUEUE_WINDOW

    def _claim(self, s: Session, task_id: int, now: datetime) -> bool:
        """Re-check a slot under the task's row lock (PostgreSQL runs leases concurrently).

        SQLite write transactions are already serial (BEGIN IMMEDIATE), so the first check
        stands there. On PostgreSQL two transactions could both see the last free slot;
        ``FOR UPDATE`` serialises them on the task row and the recount sees the winner's lease.
        """
        if self.engines.is_sqlite:
            return True
        n, needed, status = s.execute(
            select(Task.n_annotations, Task.needed, Task.status)
            .where(Task.id == task_id)
            .with_for_update()
        ).one()
        live = s.scalar(
            select(func.count())
            .select_from(Assignment)
            .where(
                Assignment.task_id == task_id,
                Assignment.state == "leased",
                Assignment.expires_at > now,
            )
        )
        return bool(status == "open" and n + (live or 0) < needed)

    def skip(self, annotator_id: int, task_id: int) -> None:
        """Give a leased task back; it is requeued for others, never offered to this annotator."""

        def tx(s: Session) -> None:
            asg = s.scalars(
                select(Assignment).where(
                    Assignment.task_id == task_id, Assignment.annotator_id == annotator_id
                )
            ).one_or_none()
            if asg is None or asg.state != "leased":
                raise ConflictError(f"task {task_id} is not leased to annotator {annotator_id}")
            asg.state = "skipped"

        self._committer.run(tx)

    def submit(
        self, annotator_id: int, task_id: int, value: Any, time_spent_ms: int
    ) -> SubmitResult:
        """Record, sign and score an annotation of a task leased to the annotator.

        Raises :class:`LabelSchemaError` for a value that does not fit the schema,
        :class:`ConflictError` without a live lease (expired, skipped or already submitted).
        """
        if isinstance(time_spent_ms, bool) or not isinstance(time_spent_ms, int):
            raise CurationError("time_spent_ms must be an integer")
        if not 0 <= time_spent_ms <= 7 * 86400 * 1000:
            raise CurationError(f"time_spent_ms must be 0..604800000, got {time_spent_ms}")
        return self._committer.run(
            lambda s: self._submit_tx(s, annotator_id, task_id, value, time_spent_ms)
        )

    def _submit_tx(
        self, s: Session, annotator_id: int, task_id: int, value: Any, time_spent_ms: int
    ) -> SubmitResult:
        # Core statements, not ORM objects: this is the hot path of the platform, and the
        # ORM's per-object bookkeeping cost more than the SQL itself.
        now = self._clock()
        row = s.execute(
            select(
                Assignment.id,
                Assignment.state,
                Assignment.expires_at,
                Task.digest,
                Task.is_gold,
                Task.gold,
                Task.status,
                TaskSet.label_schema,
                Annotator.public_id,
                Annotator.disabled,
            )
            .join(Task, Task.id == Assignment.task_id)
            .join(TaskSet, TaskSet.id == Task.task_set_id)
            .join(Annotator, Annotator.id == Assignment.annotator_id)
            .where(Assignment.task_id == task_id, Assignment.annotator_id == annotator_id)
        ).one_or_none()
        if row is None:
            if s.scalar(select(Task.id).where(Task.id == task_id)) is None:
                raise NotFoundError(f"task {task_id} does not exist")
            raise ConflictError(f"task {task_id} is not leased to annotator {annotator_id}")
        asg_id, state, expires, digest, is_gold, gold, status, raw_schema, public_id, disabled = row
        if disabled:
            raise AuthError(f"annotator {annotator_id} is disabled")
        if state != "leased":
            raise ConflictError(f"task {task_id} was already {state} by this annotator")
        if _aware(expires) <= now:
            raise ConflictError(f"the lease on task {task_id} expired; fetch a new task")
        schema = parse_schema(raw_schema)
        value = validate_value(schema, value)
        created_ms = int(now.timestamp() * 1000)
        record = signed_record(digest, public_id, value, time_spent_ms, created_ms)
        signer, signature = sign_record(self.identity, record)
        ann_id = s.execute(
            insert(Annotation)
            .values(
                task_id=task_id,
                annotator_id=annotator_id,
                value=value,
                time_spent_ms=time_spent_ms,
                created_at_ms=created_ms,
                signer_public_key=signer,
                signature=signature,
            )
            .returning(Annotation.id)
        ).scalar_one()
        s.execute(update(Assignment).where(Assignment.id == asg_id).values(state="submitted"))
        # The row lock taken here orders concurrent submits of one task (PostgreSQL).
        n, needed = s.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(n_annotations=Task.n_annotations + 1)
            .returning(Task.n_annotations, Task.needed)
            .execution_options(synchronize_session=False)
        ).one()
        changes: dict[int, _ScoreChange] = {annotator_id: _ScoreChange()}
        changes[annotator_id].points.append((POINTS_PER_ANNOTATION, "annotation"))
        finalised = False
        if is_gold:
            correct = quality.agrees(schema, value, gold)
            changes[annotator_id].gold = correct
            if correct:
                changes[annotator_id].points.append((POINTS_FOR_AGREEMENT, "gold correct"))
        elif n >= needed and status == "open":
            finalised = self._maybe_finalise(s, task_id, n, schema, changes)
        self._apply_scores(s, changes, task_id, now)
        return SubmitResult(
            annotation_id=ann_id,
            task_id=task_id,
            finalised=finalised,
            points_awarded=sum(d for d, _ in changes[annotator_id].points),
            signature=signature,
        )

    # -- quality --------------------------------------------------------------------------
    def _apply_scores(
        self, s: Session, changes: dict[int, _ScoreChange], task_id: int, now: datetime
    ) -> None:
        """Update annotators in ascending id order (a fixed lock order: no deadlocks)."""
        ledger: list[dict[str, Any]] = []
        for aid in sorted(changes):
            ch = changes[aid]
            delta = sum(d for d, _ in ch.points)
            values: dict[str, Any] = {"points": Annotator.points + delta}
            if ch.gold is not None or ch.agreed is not None:
                gc, gt, ac, at = s.execute(
                    select(
                        Annotator.gold_correct,
                        Annotator.gold_total,
                        Annotator.agree_count,
                        Annotator.agree_total,
                    )
                    .where(Annotator.id == aid)
                    .with_for_update()
                ).one()
                if ch.gold is not None:
                    gt, gc = gt + 1, gc + int(ch.gold)
                if ch.agreed is not None:
                    at, ac = at + 1, ac + int(ch.agreed)
                values.update(
                    gold_correct=gc,
                    gold_total=gt,
                    agree_count=ac,
                    agree_total=at,
                    reputation=quality.reputation_score(gc, gt, ac, at),
                )
            s.execute(
                update(Annotator)
                .where(Annotator.id == aid)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            ledger += [
                {
                    "annotator_id": aid,
                    "delta": d,
                    "reason": reason,
                    "task_id": task_id,
                    "created_at": now,
                }
                for d, reason in ch.points
            ]
        if ledger:
            s.execute(insert(PointsEntry), ledger)

    def _maybe_finalise(
        self,
        s: Session,
        task_id: int,
        n_annotations: int,
        schema: LabelSchema,
        changes: dict[int, _ScoreChange],
    ) -> bool:
        threshold, cap = s.execute(
            select(TaskSet.agreement_threshold, TaskSet.max_annotations)
            .join(Task, Task.task_set_id == TaskSet.id)
            .where(Task.id == task_id)
        ).one()
        rows = s.execute(
            select(Annotation.annotator_id, Annotation.value, Annotator.reputation)
            .join(Annotator, Annotator.id == Annotation.annotator_id)
            .where(Annotation.task_id == task_id)
            .order_by(Annotation.id)
        ).all()
        result = quality.task_consensus(schema, [r[1] for r in rows], [r[2] for r in rows])
        enough = result.agreement is None or result.agreement >= threshold
        values: dict[str, Any] = {"consensus": result.label, "agreement": result.agreement}
        if not enough and n_annotations < cap:
            values["needed"] = n_annotations + 1
            log.debug(
                "task %d agreement %.2f below %.2f: asking for annotation %d",
                task_id,
                result.agreement or 0.0,
                threshold,
                n_annotations + 1,
            )
        else:
            values["status"] = "finalised"
        s.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if "status" not in values:
            return False
        if result.label is not None:
            for aid, value, _ in rows:
                agreed = quality.agrees(schema, value, result.label)
                ch = changes.setdefault(aid, _ScoreChange())
                ch.agreed = agreed
                if agreed:
                    ch.points.append((POINTS_FOR_AGREEMENT, "agreed with consensus"))
        return True

    # -- reading back ---------------------------------------------------------------------
    def annotations(self, task_set_id: int) -> list[tuple[TaskRecord, AnnotationRecord]]:
        """Every annotation of a task set with its task, in task then submission order."""
        with self._read() as s:
            rows = s.execute(
                select(Task, Annotation, Annotator.public_id)
                .join(Annotation, Annotation.task_id == Task.id)
                .join(Annotator, Annotator.id == Annotation.annotator_id)
                .where(Task.task_set_id == task_set_id)
                .order_by(Task.id, Annotation.id)
            ).all()
            return [
                (
                    _task_record(t),
                    AnnotationRecord(
                        id=a.id,
                        task_id=a.task_id,
                        annotator_id=a.annotator_id,
                        annotator_public_id=pub,
                        value=a.value,
                        time_spent_ms=a.time_spent_ms,
                        created_at_ms=a.created_at_ms,
                        signer_public_key=a.signer_public_key,
                        signature=a.signature,
                    ),
                )
                for t, a, pub in rows
            ]

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
