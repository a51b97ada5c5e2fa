"""Engines for the curation store: SQLite in WAL mode by default, PostgreSQL by URL.

SQLite allows one writer at a time. A deferred ``BEGIN`` that later writes can fail with
"database is locked" when two transactions try to upgrade at once, so the store writes through
a second engine whose transactions start with ``BEGIN IMMEDIATE`` (the writer lock is taken
up front and waiters queue on ``busy_timeout``). ``synchronous=FULL`` makes every
acknowledged commit durable across power loss, not only across a process crash.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from swarmlm.curation.errors import CurationError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Engines:
    """``read`` for queries, ``write`` for transactions that modify the store."""

    read: Engine
    write: Engine

    @property
    def url(self) -> str:
        return self.read.url.render_as_string(hide_password=True)

    @property
    def is_sqlite(self) -> bool:
        return self.read.dialect.name == "sqlite"

    def dispose(self) -> None:
        self.read.dispose()
        if self.write is not self.read:
            self.write.dispose()


class RawSql:
    """Prepared DB-API SQL for the hot paths, in the same storage formats as SQLAlchemy.

    Leasing and submitting run a handful of tiny statements each; through SQLAlchemy every
    one costs 70-350 us of Python (statement building, cache keys, result metadata,
    savepoints) against 1-5 us for the SQLite call itself. So those paths write SQL once,
    with ``?`` placeholders, and this class adapts it to the driver: ``?`` becomes ``%s`` for
    pg8000 and ``?json`` marks a JSON parameter (``CAST(%s AS JSON)`` there). Values are
    stored exactly as SQLAlchemy's column types store them, so ORM and raw reads agree:
    SQLite datetimes as naive UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``, JSON as ``json.dumps``
    text; PostgreSQL gets aware datetimes and hands JSON back decoded.
    """

    def __init__(self, is_sqlite: bool) -> None:
        self.is_sqlite = is_sqlite
        self._cache: dict[str, str] = {}

    def q(self, sql: str) -> str:
        out = self._cache.get(sql)
        if out is None:
            if self.is_sqlite:
                out = sql.replace("?json", "?")
            else:
                out = sql.replace("?json", "CAST(%s AS JSON)").replace("?", "%s")
            self._cache[sql] = out
        return out

    def ts(self, dt: datetime) -> Any:
        """A timezone-aware datetime as a bind parameter."""
        if self.is_sqlite:
            return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        return dt

    def from_ts(self, value: Any) -> datetime:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        dt: datetime = value
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)

    @staticmethod
    def json(value: Any) -> str:
        return json.dumps(value)

    def from_json(self, value: Any) -> Any:
        if self.is_sqlite and isinstance(value, str):
            return json.loads(value)
        return value


def default_db_url(node_dir: Path) -> str:
    """``sqlite:///<node_dir>/curation.db``, creating the directory."""
    node_dir = Path(node_dir)
    node_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(node_dir / 'curation.db').resolve()}"


def normalize_url(url: str) -> str:
    """Accept bare ``postgresql://`` URLs and route them to the pure-Python pg8000 driver."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise CurationError(f"invalid database URL {url!r}: {e}") from e
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+pg8000")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise CurationError(
            f"database URL {u.render_as_string(hide_password=True)!r}: only sqlite and "
            "postgresql are supported"
        )
    return u.render_as_string(hide_password=False)


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (it holds password hashes).

    SQLite gives its ``-wal`` and ``-shm`` files the mode of the database file, so creating
    that file 0600 before SQLite does keeps all three private whatever the umask. An
    existing file that others can read is tightened too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(mode & 0o700)
        except OSError as e:  # not ours to change: say so rather than fail to open
            log.warning("could not make %s private (mode %o): %s", path, mode, e)


def create_engines(url: str) -> Engines:
    """Open the database at ``url`` (no schema changes; call :func:`migrate` for that)."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        db = make_url(url).database
        if db and db != ":memory:" and not db.startswith("file:"):
            _create_private(Path(db))
        return Engines(read=_sqlite_engine(url, False), write=_sqlite_engine(url, True))
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    return Engines(read=engine, write=engine)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(engines: Engines, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (idempotent)."""
    cfg = alembic_config()
    with engines.write.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("curation store at %s migrated to %s", engines.url, revision)
