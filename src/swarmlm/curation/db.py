"""Engines for the curation store: SQLite in WAL mode by default, PostgreSQL by URL.

SQLite allows one writer at a time. A deferred ``BEGIN`` that later writes can fail with
"database is locked" when two transactions try to upgrade at once, so the store writes through
a second engine whose transactions start with ``BEGIN IMMEDIATE`` (the writer lock is taken
up front and waiters queue on ``busy_timeout``). ``synchronous=FULL`` makes every
acknowledged commit durable across power loss, not only across a process crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


def create_engines(url: str) -> Engines:
    """Open the database at ``url`` (no schema changes; call :func:`migrate` for that)."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        db = make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
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
