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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Integer as IntegerType
from sqlalchemy import and_, bindparam, delete, func, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swarmlm.curation import quality
from swarmlm.curation.db import Engines, RawSql, create_engines, migrate
from swarmlm.curation.errors import (
    AuthError,
    ConflictError,
    CurationError,
    LabelSchemaError,
    NotFoundError,
    WrongCredentialsError,
)
from swarmlm.curation.group_commit import GroupCommitter, WriteTx
from swarmlm.curation.models import (
    OPEN_TASK_PREDICATE,
    Annotation,
    Annotator,
    ApiToken,
    Assignment,
    AuthEpoch,
    PointsEntry,
    ReplicaRecordRow,
    Task,
    TaskSet,
    WebSession,
)
from swarmlm.curation.replica import (
    KIND_ORDER,
    TASK_BATCH,
    RecordError,
    ReplicaRecord,
    annotation_record,
    definition_digest,
    make_record,
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

ROLES: tuple[str, ...] = ("annotator", "reviewer", "admin")
T = TypeVar("T")
USERNAME_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
POINTS_PER_ANNOTATION = 1
POINTS_FOR_AGREEMENT = 2
_QUEUE_WINDOW = 64
_AUTH_CACHE_SIZE = 10_000


def qualified_username(username: str, public_id: str) -> str:
    """The name a peer's account is held under when its own name is taken here.

    ``~`` is not allowed in registered names, so this never collides with one.
    """
    return f"{username[:57]}~{public_id[:6]}"


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


class _NeedsDependencyError(Exception):
    """A record needs another record first (internal to the merge)."""


class _LostConflictError(Exception):
    """A record loses to one already applied (internal to the merge)."""


def _check_task_set_params(
    name: str, k: int, cap: int, agreement_threshold: float, gold_share: float, lease: int
) -> None:
    if not 1 <= len(name) <= 200:
        raise CurationError("task set name must be 1-200 characters")
    if not 1 <= k <= 100:
        raise CurationError(f"k must be between 1 and 100, got {k}")
    if not k <= cap <= 1000:
        raise CurationError(f"max_annotations must be between k={k} and 1000, got {cap}")
    if not 0.0 <= agreement_threshold <= 1.0:
        raise CurationError(f"agreement_threshold must be in [0, 1], got {agreement_threshold}")
    if not 0.0 <= gold_share <= 1.0:
        raise CurationError(f"gold_share must be in [0, 1], got {gold_share}")
    if not 10 <= lease <= 7 * 86400:
        raise CurationError(f"lease_seconds must be 10..604800, got {lease}")


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

    def __init__(
        self,
        engines: Engines,
        identity: NodeIdentity,
        *,
        rng: random.Random | None = None,
        password_hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = utcnow,
        replicated: bool = False,
    ) -> None:
        self.engines = engines
        self.replicated = replicated
        # Called (outside any transaction) with the records each local change produced.
        self._listeners: list[Callable[[LocalChange], None]] = []
        # task digest -> does this node serve it first (None: every task is preferred)
        self.task_preference: Callable[[str], bool] | None = None
        self.identity = identity
        self._rng = rng or random.Random()
        self._hasher = password_hasher or PasswordHasher()
        self._clock = clock
        self._sql = RawSql(engines.is_sqlite)
        dbapi = engines.write.dialect.dbapi
        self._integrity_errors: tuple[type[BaseException], ...] = (
            (dbapi.IntegrityError,) if dbapi is not None else (IntegrityError,)
        )
        # Leases and submissions go through one writer thread that commits them in groups.
        self._committer = GroupCommitter(engines.write, self._sql)
        self._cache_lock = threading.Lock()
        self._schemas: dict[int, LabelSchema] = {}
        # token hash -> (auth epoch when read, annotator, csrf or None, expiry or None)
        self._auth_cache: OrderedDict[
            str, tuple[int, AnnotatorInfo, str | None, datetime | None]
        ] = OrderedDict()

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

    def run_write(self, fn: Callable[[WriteTx], T]) -> T:
        """Run ``fn`` as one request of the group commit; returns once it is committed.

        For the admin modules (data manager, reviews): their writes take the same writer
        (and, on SQLite, the same writer lock) as leases and submissions, so they never
        interleave with a batch halfway.
        """
        return self._committer.run(fn)

    @contextmanager
    def read_cursor(self) -> Iterator[tuple[Any, RawSql]]:
        """A DB-API cursor on the read engine (one transaction) and its SQL adapter."""
        with self.engines.read.connect() as conn:
            dbapi_conn = conn.connection.dbapi_connection
            assert dbapi_conn is not None
            cur = dbapi_conn.cursor()
            try:
                yield cur, self._sql
            finally:
                cur.close()
                conn.rollback()

    def apply_score_changes(
        self, tx: WriteTx, changes: dict[int, ScoreChange], task_id: int
    ) -> None:
        """Points, gold/agreement counters and reputation of several annotators at once."""
        self._apply_scores(tx, changes, task_id, self._clock())

    def now(self) -> datetime:
        return self._clock()

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
        public_id = secrets.token_hex(16)
        record = make_record(
            self.identity,
            "annotator",
            {"public_id": public_id, "username": username, "password_hash": pw_hash},
        )
        try:
            with self._write() as s:
                a = Annotator(
                    public_id=public_id,
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
                    record_digest=record.hex,
                )
                s.add(a)
                self._add_record_rows(s, [record])
                s.flush()
                info = _annotator_info(a)
        except IntegrityError as e:
            raise ConflictError(f"username {username!r} is already taken") from e
        self._notify([record])
        return info

    def authenticate(self, username: str, password: str) -> AnnotatorInfo:
        """Check a password; one error message for every failure, so it leaks nothing."""
        with self._read() as s:
            a = s.scalars(select(Annotator).where(Annotator.username == username)).one_or_none()
            stored = a.password_hash if a is not None else None
        if a is None or stored is None:
            # Spend the same time as a real check so usernames cannot be probed by timing.
            self._hasher.hash(password)
            raise WrongCredentialsError("wrong username or password")
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError) as e:
            raise WrongCredentialsError("wrong username or password") from e
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
            self._bump_auth_epoch(s)

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
            self._bump_auth_epoch(s)

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
            n = _rowcount(s.execute(delete(ApiToken).where(ApiToken.annotator_id == annotator_id)))
            self._bump_auth_epoch(s)
            return n

    def reset_password(self, annotator_id: int) -> str:
        """Give the account a new random password (returned once, never stored in clear)
        and end its sessions and API tokens. Local to this node: a replicated account keeps
        its old password at the other nodes."""
        password = secrets.token_urlsafe(12)
        pw_hash = self._hasher.hash(password)
        with self._write() as s:
            n = _rowcount(
                s.execute(
                    update(Annotator)
                    .where(Annotator.id == annotator_id)
                    .values(password_hash=pw_hash)
                )
            )
            if not n:
                raise NotFoundError(f"annotator {annotator_id} does not exist")
            s.execute(delete(WebSession).where(WebSession.annotator_id == annotator_id))
            s.execute(delete(ApiToken).where(ApiToken.annotator_id == annotator_id))
            self._bump_auth_epoch(s)
        return password

    # -- cached credential lookups ----------------------------------------------------------
    # Every API call and page load resolves a token or session cookie. The answers are cached
    # per process and tagged with the auth epoch read in the same statement; each lookup
    # re-reads the epoch (one primary-key read), and any revocation (disable, enable, role
    # change, token revocation, logout) bumps it in its own transaction, so no process, this
    # one or another, serves a cached answer older than the last revocation. Cached
    # AnnotatorInfo is for identity and role: points and reputation in it may lag.
    _ANNOTATOR_SQL_COLUMNS = (
        "a.id, a.public_id, a.username, a.role, a.disabled, a.points, a.reputation,"
        " a.gold_correct, a.gold_total, a.agree_count, a.agree_total"
    )

    def _read_rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self.engines.read.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute(self._sql.q(sql), params)
            rows: list[Any] = list(cur.fetchall())
            cur.close()
        finally:
            conn.close()  # back to the pool, which ends the read transaction
        return rows

    def _auth_epoch(self) -> int | None:
        rows = self._read_rows("SELECT epoch FROM auth_epoch WHERE id = 1", ())
        return int(rows[0][0]) if rows else None

    @staticmethod
    def _info_from_row(row: Any) -> AnnotatorInfo:
        return AnnotatorInfo(
            id=int(row[0]),
            public_id=row[1],
            username=row[2],
            role=row[3],
            disabled=bool(row[4]),
            points=int(row[5]),
            reputation=float(row[6]),
            gold_correct=int(row[7]),
            gold_total=int(row[8]),
            agree_count=int(row[9]),
            agree_total=int(row[10]),
        )

    def _cached_credential(
        self, kind: str, token_hash: str, sql: str
    ) -> tuple[AnnotatorInfo, str | None, datetime | None] | None:
        """``(annotator, csrf, expiry)`` for a credential hash, cached while the epoch holds.

        ``sql`` selects the epoch, the annotator columns, then csrf and expiry for the hash.
        ``kind`` keeps API tokens and session tokens apart in the cache (a session token
        must never pass as a bearer token, nor the reverse).
        """
        key = f"{kind}:{token_hash}"
        epoch = self._auth_epoch()
        if epoch is not None:
            with self._cache_lock:
                hit = self._auth_cache.get(key)
                if hit is not None and hit[0] == epoch:
                    self._auth_cache.move_to_end(key)
                    return hit[1], hit[2], hit[3]
        rows = self._read_rows(sql, (token_hash,))
        if not rows:
            return None
        row = rows[0]
        info = self._info_from_row(row[1:12])
        csrf = row[12]
        expires = None if row[13] is None else self._sql.from_ts(row[13])
        if row[0] is not None:
            with self._cache_lock:
                self._auth_cache[key] = (int(row[0]), info, csrf, expires)
                self._auth_cache.move_to_end(key)
                while len(self._auth_cache) > _AUTH_CACHE_SIZE:
                    self._auth_cache.popitem(last=False)
        return info, csrf, expires

    @staticmethod
    def _bump_auth_epoch(s: Session) -> None:
        s.execute(update(AuthEpoch).where(AuthEpoch.id == 1).values(epoch=AuthEpoch.epoch + 1))

    def annotator_for_token(self, token: str) -> AnnotatorInfo | None:
        """The enabled account owning ``token``, or ``None`` (checked on every API call)."""
        found = self._cached_credential(
            "token",
            _hash_token(token),
            "SELECT (SELECT epoch FROM auth_epoch WHERE id = 1), "
            + self._ANNOTATOR_SQL_COLUMNS
            + ", NULL, NULL FROM annotators a JOIN api_tokens t ON t.annotator_id = a.id"
            " WHERE t.token_hash = ?",
        )
        if found is None or found[0].disabled:
            return None
        return found[0]

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
        found = self._cached_credential(
            "session",
            _hash_token(token),
            "SELECT (SELECT epoch FROM auth_epoch WHERE id = 1), "
            + self._ANNOTATOR_SQL_COLUMNS
            + ", w.csrf_token, w.expires_at FROM annotators a"
            " JOIN web_sessions w ON w.annotator_id = a.id WHERE w.token_hash = ?",
        )
        if found is None:
            return None
        info, csrf, expires = found
        if info.disabled or csrf is None or expires is None or expires < self._clock():
            return None
        return info, csrf

    def delete_session(self, token: str) -> None:
        with self._write() as s:
            s.execute(delete(WebSession).where(WebSession.token_hash == _hash_token(token)))
            self._bump_auth_epoch(s)

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
        cap = 2 * k if max_annotations is None else max_annotations
        _check_task_set_params(name, k, cap, agreement_threshold, gold_share, lease_seconds)
        record = make_record(
            self.identity,
            "task_set",
            {
                "name": name,
                "description": description,
                "schema": schema_to_dict(parsed),
                "k": k,
                "max_annotations": cap,
                "agreement_threshold": float(agreement_threshold),
                "gold_share": float(gold_share),
                "lease_seconds": lease_seconds,
            },
        )
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
                    record_digest=definition_digest(record.body),
                )
                s.add(ts)
                self._add_record_rows(s, [record])
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
                    update(TaskSet)
                    .where(TaskSet.id == task_set_id)
                    .values(description=description)
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

    _TASK_COLUMNS = (
        "id, task_set_id, external_id, content, outputs, gold, is_gold, digest, needed,"
        " n_annotations, status, consensus, agreement"
    )

    def _raw_task_records(self, cur: Any, sql: RawSql) -> Iterator[TaskRecord]:
        # Raw rows: through the ORM, reading 100k tasks cost seconds of type processing.
        while rows := cur.fetchmany(2000):
            for r in rows:
                yield TaskRecord(
                    id=int(r[0]),
                    task_set_id=int(r[1]),
                    external_id=r[2],
                    content=sql.from_json(r[3]),
                    outputs=sql.from_json(r[4]),
                    gold=sql.from_json(r[5]),
                    is_gold=bool(r[6]),
                    digest=r[7],
                    needed=int(r[8]),
                    n_annotations=int(r[9]),
                    status=r[10],
                    consensus=sql.from_json(r[11]),
                    agreement=r[12],
                )

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
        """The task set's parsed label schema (immutable once created, so cached per id)."""
        schema = self._schemas.get(task_set_id)
        if schema is None:
            row = tx.one("SELECT label_schema FROM task_sets WHERE id = ?", (task_set_id,))
            if row is None:
                raise NotFoundError(f"task set {task_set_id} does not exist")
            schema = parse_schema(tx.sql.from_json(row[0]))
            with self._cache_lock:
                if len(self._schemas) >= 4096:
                    self._schemas.clear()
                self._schemas[task_set_id] = schema
        return schema

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
        schema = self._schema(tx, ts_id)
        value = validate_value(schema, value)
        created_ms = int(now.timestamp() * 1000)
        record = signed_record(digest, public_id, value, time_spent_ms, created_ms)
        signer, signature = sign_record(self.identity, record)
        replica = annotation_record(self.identity, ts_name, record, signer, signature)
        (ann_id,) = tx.one(
            "INSERT INTO annotations (task_id, annotator_id, value, time_spent_ms,"
            " created_at_ms, signer_public_key, signature, digest)"
            " VALUES (?, ?, ?json, ?, ?, ?, ?, ?) RETURNING id",
            (
                task_id,
                annotator_id,
                sql.json(value),
                time_spent_ms,
                created_ms,
                signer,
                signature,
                replica.hex,
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

    # -- replication ----------------------------------------------------------------------
    # Every local change that other nodes need (task set, task batch, account, annotation)
    # writes its signed record into ``replica_records`` in the same transaction, so what the
    # store holds and what it can serve to peers never disagree. See docs/curation-replication.md.
    def add_listener(self, callback: Callable[[LocalChange], None]) -> None:
        """Call ``callback(change)`` after each committed local change, on the thread that
        made it (a worker thread or the event loop): it must be quick and thread-safe."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[LocalChange], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(
        self, records: list[ReplicaRecord], finalised: list[tuple[str, str]] | None = None
    ) -> None:
        if not records:
            return
        change = LocalChange(records, finalised or [])
        for cb in list(self._listeners):
            try:
                cb(change)
            except Exception:
                log.exception("replication listener %r failed", cb)

    def _add_record_rows(self, s: Session, records: list[ReplicaRecord]) -> None:
        now_ms = int(self._clock().timestamp() * 1000)
        for r in records:
            s.add(ReplicaRecordRow(digest=r.hex, kind=r.kind, payload=r.raw, created_at_ms=now_ms))

    @staticmethod
    def _insert_record_tx(tx: WriteTx, record: ReplicaRecord, now_ms: int) -> None:
        tx.execute(
            "INSERT INTO replica_records (digest, kind, payload, created_at_ms)"
            " VALUES (?, ?, ?, ?)",
            (record.hex, record.kind, record.raw, now_ms),
        )

    def _task_set_digest(self, task_set_id: int) -> str:
        """The set's definition record digest, making the record first for an old set."""
        with self._read() as s:
            d = s.scalar(select(TaskSet.record_digest).where(TaskSet.id == task_set_id))
        if d is None:
            self.ensure_records()
            with self._read() as s:
                d = s.scalar(select(TaskSet.record_digest).where(TaskSet.id == task_set_id))
        if d is None:
            raise NotFoundError(f"task set {task_set_id} does not exist")
        return str(d)

    def _task_batch_records(
        self, task_set_name: str, ts_digest: str, rows: list[dict[str, Any]]
    ) -> list[ReplicaRecord]:
        """Sign ``rows`` (task insert dicts) in batches; sets each row's ``record_digest``."""
        out: list[ReplicaRecord] = []
        for start in range(0, len(rows), TASK_BATCH):
            chunk = rows[start : start + TASK_BATCH]
            rec = make_record(
                self.identity,
                "tasks",
                {
                    "task_set": task_set_name,
                    "task_set_digest": ts_digest,
                    "tasks": [
                        {
                            "external_id": r["external_id"],
                            "content": r["content"],
                            "outputs": r["outputs"],
                            "gold": r["gold"],
                        }
                        for r in chunk
                    ],
                },
            )
            for r in chunk:
                r["record_digest"] = rec.hex
            out.append(rec)
        return out

    def ensure_records(self) -> int:
        """Sign records for rows made before replication existed; returns how many.

        Task sets, tasks and accounts made here are signed by this node; old annotations keep
        the signature they already carry. Idempotent (rows with a record are skipped).
        """
        made: list[ReplicaRecord] = []
        with self._write() as s:
            for ts in s.scalars(select(TaskSet).where(TaskSet.record_digest.is_(None))):
                rec = make_record(
                    self.identity,
                    "task_set",
                    {
                        "name": ts.name,
                        "description": ts.description,
                        "schema": ts.label_schema,
                        "k": ts.k,
                        "max_annotations": ts.max_annotations,
                        "agreement_threshold": float(ts.agreement_threshold),
                        "gold_share": float(ts.gold_share),
                        "lease_seconds": ts.lease_seconds,
                    },
                )
                ts.record_digest = definition_digest(rec.body)
                made.append(rec)
            s.flush()
            sets = {ts.id: ts for ts in s.scalars(select(TaskSet))}
            by_set: dict[int, list[Task]] = {}
            for t in s.scalars(select(Task).where(Task.record_digest.is_(None)).order_by(Task.id)):
                by_set.setdefault(t.task_set_id, []).append(t)
            for ts_id, tasks in by_set.items():
                ts = sets[ts_id]
                rows = [
                    {
                        "external_id": t.external_id,
                        "content": t.content,
                        "outputs": t.outputs,
                        "gold": t.gold,
                    }
                    for t in tasks
                ]
                made += self._task_batch_records(ts.name, str(ts.record_digest), rows)
                for t, r in zip(tasks, rows, strict=True):
                    t.record_digest = r["record_digest"]
            for a in s.scalars(select(Annotator).where(Annotator.record_digest.is_(None))):
                rec = make_record(
                    self.identity,
                    "annotator",
                    {"public_id": a.public_id, "username": a.username,
                     "password_hash": a.password_hash},
                )  # fmt: skip
                a.record_digest = rec.hex
                made.append(rec)
            rows_a = s.execute(
                select(Annotation, Task.digest, Annotator.public_id, TaskSet.name)
                .join(Task, Task.id == Annotation.task_id)
                .join(TaskSet, TaskSet.id == Task.task_set_id)
                .join(Annotator, Annotator.id == Annotation.annotator_id)
                .where(Annotation.digest.is_(None))
            ).all()
            for ann, tdigest, pub, ts_name in rows_a:
                body = signed_record(tdigest, pub, ann.value, ann.time_spent_ms, ann.created_at_ms)
                rec = annotation_record(
                    self.identity, ts_name, body, ann.signer_public_key, ann.signature
                )
                ann.digest = rec.hex
                made.append(rec)
            held = set(s.scalars(select(ReplicaRecordRow.digest)))
            self._add_record_rows(s, [r for r in made if r.hex not in held])
        if made:
            log.info("signed %d replication records for rows made before replication", len(made))
        return len(made)

    def record_digests(self) -> list[bytes]:
        """Digests of every record held (the anti-entropy summary is built from these)."""
        with self._read() as s:
            return [bytes.fromhex(d) for d in s.scalars(select(ReplicaRecordRow.digest))]

    def get_records(self, digests: Iterable[bytes]) -> list[bytes]:
        """The wire bytes of the held records among ``digests`` (unknown ones are skipped)."""
        wanted = [d.hex() for d in digests]
        out: list[tuple[str, bytes]] = []
        with self._read() as s:
            for start in range(0, len(wanted), 500):
                out += [
                    (k, bytes(p))
                    for k, p in s.execute(
                        select(ReplicaRecordRow.kind, ReplicaRecordRow.payload).where(
                            ReplicaRecordRow.digest.in_(wanted[start : start + 500])
                        )
                    ).all()
                ]
        out.sort(key=lambda kp: KIND_ORDER.get(kp[0], 99))  # dependencies first
        return [p for _, p in out]

    def update_preferences(self, prefer: Callable[[str], bool] | None) -> int:
        """Mark which tasks this node serves first (``prefer(task digest)``); None: all.

        Also used for tasks added or merged later. Returns how many tasks changed.
        """
        self.task_preference = prefer
        with self._write() as s:
            rows = s.execute(select(Task.id, Task.digest, Task.preferred)).all()
            changes = [
                {"tid": tid, "p": want}
                for tid, dg, cur in rows
                if (want := 1 if prefer is None or prefer(dg) else 0) != cur
            ]
            if changes:
                s.connection().execute(
                    update(Task.__table__)  # type: ignore[arg-type]
                    .where(Task.__table__.c.id == bindparam("tid"))
                    .values(preferred=bindparam("p")),
                    changes,
                )
        return len(changes)

    def merge_records(self, records: list[ReplicaRecord]) -> MergeResult:
        """Apply verified records from peers in one transaction (idempotent: union by digest).

        ``records`` must come from :func:`swarmlm.curation.replica.decode_record` (shape and
        signature checked); the rules that need the database are checked here. Records are
        applied in dependency order (task sets, tasks, accounts, annotations).
        """
        ordered = sorted(records, key=lambda r: (KIND_ORDER[r.kind], r.digest))
        return self._committer.run(lambda tx: self._merge_tx(tx, ordered))

    async def merge_records_async(self, records: list[ReplicaRecord]) -> MergeResult:
        """:meth:`merge_records` for an event loop."""
        ordered = sorted(records, key=lambda r: (KIND_ORDER[r.kind], r.digest))
        return await self._committer.run_async(lambda tx: self._merge_tx(tx, ordered))

    def _merge_tx(self, tx: WriteTx, records: list[ReplicaRecord]) -> MergeResult:
        out = MergeResult()
        now = self._clock()
        now_ms = int(now.timestamp() * 1000)
        seen: set[bytes] = set()
        for rec in records:
            if rec.digest in seen or tx.one(
                "SELECT 1 FROM replica_records WHERE digest = ?", (rec.hex,)
            ):
                out.duplicates += 1
                continue
            seen.add(rec.digest)
            tx.execute("SAVEPOINT replica_record")
            try:
                if rec.kind == "task_set":
                    self._merge_task_set(tx, rec, now)
                elif rec.kind == "tasks":
                    self._merge_tasks(tx, rec, now)
                elif rec.kind == "annotator":
                    self._merge_annotator(tx, rec, now)
                else:
                    done = self._merge_annotation(tx, rec, now)
                    if done is not None:
                        out.finalised.append(done)
            except _NeedsDependencyError:
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                seen.discard(rec.digest)
                out.parked.append(rec)
                continue
            except _LostConflictError as c:
                # Held (so anti-entropy stops offering it) but not applied: first one wins.
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                self._insert_record_tx(tx, rec, now_ms)
                out.conflicts.append((rec.hex, str(c)))
                continue
            except (CurationError, ValueError, TypeError, KeyError) as e:
                tx.execute("ROLLBACK TO SAVEPOINT replica_record")
                tx.execute("RELEASE SAVEPOINT replica_record")
                detail = e.detail if isinstance(e, RecordError) else str(e)
                out.invalid.append((rec, f"{rec.kind} record {rec.hex[:12]}: {detail}"))
                continue
            self._insert_record_tx(tx, rec, now_ms)
            tx.execute("RELEASE SAVEPOINT replica_record")
            out.accepted.append(rec)
        return out

    def _merge_task_set(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        parsed = parse_schema(b["schema"])
        _check_task_set_params(
            b["name"],
            b["k"],
            b["max_annotations"],
            float(b["agreement_threshold"]),
            float(b["gold_share"]),
            b["lease_seconds"],
        )
        if b["name"] != b["name"].strip():
            raise CurationError("task set name has surrounding spaces")
        definition = definition_digest(b)
        row = tx.one("SELECT record_digest FROM task_sets WHERE name = ?", (b["name"],))
        if row is not None:
            if row[0] == definition:
                return  # the same definition, made on another node too: one set
            raise _LostConflictError(f"a different task set named {b['name']!r} is held")
        tx.execute(
            "INSERT INTO task_sets (name, description, label_schema, k, max_annotations,"
            " agreement_threshold, gold_share, lease_seconds, active, created_at, record_digest)"
            " VALUES (?, ?, ?json, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                b["name"],
                b["description"],
                tx.sql.json(schema_to_dict(parsed)),
                b["k"],
                b["max_annotations"],
                float(b["agreement_threshold"]),
                float(b["gold_share"]),
                b["lease_seconds"],
                True,
                tx.sql.ts(now),
                definition,
            ),
        )

    def _merge_tasks(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        row = tx.one("SELECT id, record_digest, k FROM task_sets WHERE name = ?", (b["task_set"],))
        if row is None:
            raise _NeedsDependencyError(f"task set {b['task_set']!r} not held yet")
        ts_id, ts_digest, k = row
        if ts_digest != b["task_set_digest"]:
            raise _LostConflictError(f"tasks of another definition of set {b['task_set']!r}")
        schema = self._schema(tx, ts_id)
        prefer = self.task_preference
        sql = tx.sql
        for i, t in enumerate(b["tasks"]):
            content, outputs, gold = validate_task(
                schema, t["content"], t["outputs"], t["gold"], where=f"task {i + 1}"
            )
            digest = task_digest(t["external_id"], content, outputs)
            if tx.one(
                "SELECT 1 FROM tasks WHERE task_set_id = ? AND external_id = ?",
                (ts_id, t["external_id"]),
            ):
                continue  # another batch added this external id first: it stays
            tx.execute(
                "INSERT INTO tasks (task_set_id, external_id, content, outputs, gold, is_gold,"
                " digest, needed, n_annotations, n_leased, status, created_at, record_digest,"
                " preferred) VALUES (?, ?, ?json, ?json, ?json, ?, ?, ?, 0, 0, 'open', ?, ?, ?)",
                (
                    ts_id,
                    t["external_id"],
                    sql.json(content),
                    sql.json(outputs),
                    sql.json(gold),
                    gold is not None,
                    digest,
                    k,
                    sql.ts(now),
                    rec.hex,
                    1 if prefer is None or prefer(digest) else 0,
                ),
            )

    def _merge_annotator(self, tx: WriteTx, rec: ReplicaRecord, now: datetime) -> None:
        b = rec.body
        if not set(b["username"]) <= USERNAME_ALLOWED:
            raise CurationError(f"username {b['username']!r} has characters not allowed")
        row = tx.one("SELECT username FROM annotators WHERE public_id = ?", (b["public_id"],))
        if row is not None:
            raise _LostConflictError(f"account {b['public_id']} is already held")
        # Two accounts made on two nodes under one name (two "admin"s, typically) are both
        # held, so each one's annotations merge everywhere; one keeps the plain name: the
        # local account on its own node, and between two peers' accounts the smaller record
        # digest, so every node that holds neither names them alike whatever the order.
        name = b["username"]
        held = tx.one(
            "SELECT id, public_id, origin, record_digest FROM annotators WHERE username = ?",
            (name,),
        )
        if held is not None:
            held_id, held_public, held_origin, held_digest = held
            if held_origin is not None and held_digest is not None and rec.hex < held_digest:
                tx.execute(
                    "UPDATE annotators SET username = ? WHERE id = ?",
                    (qualified_username(name, held_public), held_id),
                )
                tx.execute("UPDATE auth_epoch SET epoch = epoch + 1 WHERE id = 1")
            else:
                name = qualified_username(name, b["public_id"])
                if tx.one("SELECT 1 FROM annotators WHERE username = ?", (name,)):
                    raise _LostConflictError(f"username {name!r} is taken here")
        # The role never travels: whatever it was at its origin, here it is an annotator.
        tx.execute(
            "INSERT INTO annotators (public_id, username, password_hash, role, disabled,"
            " created_at, points, reputation, gold_correct, gold_total, agree_count,"
            " agree_total, record_digest, origin)"
            " VALUES (?, ?, ?, 'annotator', ?, ?, 0, ?, 0, 0, 0, 0, ?, ?)",
            (
                b["public_id"],
                name,
                b["password_hash"],
                False,
                tx.sql.ts(now),
                quality.reputation_score(0, 0, 0, 0),
                rec.hex,
                rec.signer.hex(),
            ),
        )

    def _merge_annotation(
        self, tx: WriteTx, rec: ReplicaRecord, now: datetime
    ) -> tuple[str, str] | None:
        b = rec.body["annotation"]
        sql = tx.sql
        task = tx.one(
            "SELECT t.id, t.task_set_id, t.is_gold, t.gold, s.name, t.external_id"
            " FROM tasks t JOIN task_sets s ON s.id = t.task_set_id"
            " WHERE s.name = ? AND t.digest = ?",
            (rec.body["task_set"], b["task_digest"]),
        )
        if task is None:
            raise _NeedsDependencyError(f"task {b['task_digest'][:12]} not held yet")
        ann = tx.one("SELECT id FROM annotators WHERE public_id = ?", (b["annotator_id"],))
        if ann is None:
            raise _NeedsDependencyError(f"account {b['annotator_id']} not held yet")
        task_id, ts_id, is_gold, gold, ts_name, ext = task
        annotator_id = int(ann[0])
        schema = self._schema(tx, ts_id)
        validate_value(schema, b["value"])
        row = (
            b["value"],
            b["time_spent_ms"],
            b["created_at_ms"],
            rec.body["signer"].hex(),
            rec.body["signature"].hex(),
            rec.hex,
        )
        existing = tx.one(
            "SELECT id, digest FROM annotations WHERE task_id = ? AND annotator_id = ?",
            (task_id, annotator_id),
        )
        changes: dict[int, ScoreChange] = {}
        if existing is not None:
            # Two nodes accepted an answer of one annotator to one task: the smaller record
            # digest wins everywhere, whatever order they arrive in.
            if existing[1] is None or existing[1] <= rec.hex:
                raise _LostConflictError(f"annotator already answered task {ext!r}: kept that")
            tx.execute(
                "UPDATE annotations SET value = ?json, time_spent_ms = ?, created_at_ms = ?,"
                " signer_public_key = ?, signature = ?, digest = ? WHERE id = ?",
                (sql.json(row[0]), *row[1:], existing[0]),
            )
        else:
            tx.execute(
                "INSERT INTO annotations (task_id, annotator_id, value, time_spent_ms,"
                " created_at_ms, signer_public_key, signature, digest)"
                " VALUES (?, ?, ?json, ?, ?, ?, ?, ?)",
                (task_id, annotator_id, sql.json(row[0]), *row[1:]),
            )
            asg = tx.one(
                "SELECT id, state FROM assignments WHERE task_id = ? AND annotator_id = ?",
                (task_id, annotator_id),
            )
            if asg is None:
                tx.execute(
                    "INSERT INTO assignments (task_id, annotator_id, state, leased_at,"
                    " expires_at) VALUES (?, ?, 'submitted', ?, ?)",
                    (task_id, annotator_id, sql.ts(now), sql.ts(now)),
                )
            else:
                tx.execute("UPDATE assignments SET state = 'submitted' WHERE id = ?", (asg[0],))
                if asg[1] == "leased":
                    tx.execute("UPDATE tasks SET n_leased = n_leased - 1 WHERE id = ?", (task_id,))
            tx.execute(
                "UPDATE tasks SET n_annotations = n_annotations + 1 WHERE id = ?", (task_id,)
            )
            ch = changes.setdefault(annotator_id, ScoreChange())
            ch.points.append((POINTS_PER_ANNOTATION, "annotation"))
            if is_gold:
                correct = quality.agrees(schema, b["value"], sql.from_json(gold))
                ch.gold = correct
                if correct:
                    ch.points.append((POINTS_FOR_AGREEMENT, "gold correct"))
        finalised = False
        if not is_gold:
            finalised = self._settle_task(tx, task_id, ts_id, schema, changes)
        if changes:
            self._apply_scores(tx, changes, task_id, now)
        return (ts_name, ext) if finalised else None

    def _settle_task(
        self,
        tx: WriteTx,
        task_id: int,
        task_set_id: int,
        schema: LabelSchema,
        changes: dict[int, ScoreChange],
    ) -> bool:
        """Consensus, status and ``needed`` of a task as a pure function of its annotations.

        Annotations are taken in record-digest order and weigh the same, so every node that
        holds the same set computes the same result. Finalised when at least ``k`` agree
        enough, or at the cap; otherwise one more annotation is asked for. Returns True when
        this call finalised the task (agreement points are awarded then).
        """
        sql = tx.sql
        k, threshold, cap = tx.one(
            "SELECT k, agreement_threshold, max_annotations FROM task_sets WHERE id = ?",
            (task_set_id,),
        )
        (status,) = tx.one("SELECT status FROM tasks WHERE id = ?", (task_id,))
        rows = sorted(
            (digest or "", int(aid), sql.from_json(value))
            for aid, value, digest in tx.execute(
                "SELECT annotator_id, value, digest FROM annotations WHERE task_id = ?",
                (task_id,),
            ).fetchall()
        )
        n = len(rows)
        if n < k:
            tx.execute(
                "UPDATE tasks SET consensus = ?json, agreement = NULL, confidence = NULL,"
                " needed = ?, status = 'open' WHERE id = ?",
                (sql.json(None), k, task_id),
            )
            return False
        values = [v for _, _, v in rows]
        result = quality.task_consensus(schema, values, [quality.PRIOR_MEAN] * n)
        enough = result.agreement is None or result.agreement >= threshold
        final = enough or n >= cap
        tx.execute(
            "UPDATE tasks SET consensus = ?json, agreement = ?, confidence = ?, needed = ?,"
            " status = ? WHERE id = ?",
            (
                sql.json(result.label),
                result.agreement,
                result.confidence,
                n if final else n + 1,
                "finalised" if final else "open",
                task_id,
            ),
        )
        if status == "finalised" and not final:
            log.info("task %d reopened: late annotations lowered its agreement", task_id)
        if not final or status == "finalised":
            return False
        if result.label is not None:
            _score_agreement(
                changes, schema, [(aid, value) for _, aid, value in rows], result.label
            )
        return True
