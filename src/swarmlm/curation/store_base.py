"""What every part of the curation store shares: the engines, the writer, the caches.

:class:`swarmlm.curation.store.CurationStore` is assembled from parts by concern, each a
subclass of :class:`StoreBase`: accounts and credentials (``accounts.py``), task sets,
distribution and scoring (``store.py``), statistics (``statistics.py``) and everything
replication does (``replication.py``).
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swarmlm.curation.db import Engines, RawSql
from swarmlm.curation.entities import (
    AnnotatorInfo,
    LocalChange,
    ScoreChange,
    T,
    TaskRecord,
    TaskSetInfo,
    utcnow,
)
from swarmlm.curation.group_commit import GroupCommitter, WriteTx
from swarmlm.curation.replica import (
    ReplicaRecord,
)
from swarmlm.curation.schema import (
    LabelSchema,
)
from swarmlm.p2p.identity import NodeIdentity

log = logging.getLogger(__name__)


class StoreBase:
    """State and transactions shared by the parts of the curation store.

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
        # (task set id, config digest) -> (parsed schema, version); see store._schema_version
        self._schemas: dict[tuple[int, str | None], tuple[LabelSchema, int]] = {}
        # token hash -> (auth epoch when read, annotator, csrf or None, expiry or None)
        self._auth_cache: OrderedDict[
            str, tuple[int, AnnotatorInfo, str | None, datetime | None]
        ] = OrderedDict()

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

    if TYPE_CHECKING:
        # Defined by the parts CurationStore combines (store.py, replication.py); declared
        # here so each part type-checks on its own.
        def get_task_set(self, task_set_id: int) -> TaskSetInfo: ...

        def get_annotator(self, annotator_id: int) -> AnnotatorInfo: ...

        def _schema(self, tx: WriteTx, task_set_id: int) -> LabelSchema: ...

        def _schema_version(
            self, tx: WriteTx, task_set_id: int
        ) -> tuple[LabelSchema, int, str | None]: ...

        def _config_schema(
            self, tx: WriteTx, task_set_id: int, config_digest: str | None
        ) -> tuple[LabelSchema, int] | None: ...

        def _apply_scores(
            self, tx: WriteTx, changes: dict[int, ScoreChange], task_id: int, now: datetime
        ) -> None: ...

        def _notify(
            self, records: list[ReplicaRecord], finalised: list[tuple[str, str]] | None = None
        ) -> None: ...

        def _add_record_rows(self, s: Session, records: list[ReplicaRecord]) -> None: ...

        def _task_set_digest(self, task_set_id: int) -> str: ...

        def _task_batch_records(
            self, task_set_name: str, ts_digest: str, rows: list[dict[str, Any]]
        ) -> list[ReplicaRecord]: ...

        @staticmethod
        def _insert_record_tx(tx: WriteTx, record: ReplicaRecord, now_ms: int) -> None: ...
