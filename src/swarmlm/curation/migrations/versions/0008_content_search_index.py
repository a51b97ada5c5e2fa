"""A substring index for the data manager's content search, where the database has one.

- SQLite (3.34+, FTS5 with the trigram tokenizer): ``tasks_search``, an external-content
  FTS5 table over ``tasks.content`` (the stored JSON text) and ``tasks.external_id``, kept
  in step by triggers on insert, delete and an update of either column (a lease or a
  submission never touches them, so the hot paths pay nothing);
- PostgreSQL with ``pg_trgm`` (trusted since PostgreSQL 13, so the database owner may
  create it): GIN trigram indexes on ``CAST(content AS TEXT)`` and ``external_id``, which
  the planner uses for the search's ``ILIKE '%...%'`` as it is.

Where neither is available the migration does nothing and the search stays a LIKE scan
(``data_manager.search_index`` says which). These objects are dialect-specific, so they are
not in ``models.py``; ``models.SEARCH_INDEX_NAMES`` lists them for the schema comparison.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)

_SQLITE = [
    "CREATE VIRTUAL TABLE tasks_search USING fts5(content, external_id,"
    " content='tasks', content_rowid='id', tokenize='trigram')",
    "INSERT INTO tasks_search(tasks_search) VALUES ('rebuild')",
    "CREATE TRIGGER tasks_search_insert AFTER INSERT ON tasks BEGIN"
    " INSERT INTO tasks_search(rowid, content, external_id)"
    " VALUES (new.id, new.content, new.external_id); END",
    "CREATE TRIGGER tasks_search_delete AFTER DELETE ON tasks BEGIN"
    " INSERT INTO tasks_search(tasks_search, rowid, content, external_id)"
    " VALUES ('delete', old.id, old.content, old.external_id); END",
    "CREATE TRIGGER tasks_search_update AFTER UPDATE OF content, external_id ON tasks BEGIN"
    " INSERT INTO tasks_search(tasks_search, rowid, content, external_id)"
    " VALUES ('delete', old.id, old.content, old.external_id);"
    " INSERT INTO tasks_search(rowid, content, external_id)"
    " VALUES (new.id, new.content, new.external_id); END",
]


def _sqlite_has_trigram(bind: sa.engine.Connection) -> bool:
    """FTS5 compiled in, and a version with its trigram tokenizer (3.34)."""
    version = bind.exec_driver_sql("SELECT sqlite_version()").scalar_one()
    options = {row[0] for row in bind.exec_driver_sql("PRAGMA compile_options")}
    return "ENABLE_FTS5" in options and tuple(int(x) for x in version.split(".")) >= (3, 34)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        if not _sqlite_has_trigram(bind):
            log.warning("SQLite has no FTS5 trigram tokenizer: content search stays a scan")
            return
        for statement in _SQLITE:
            op.execute(statement)
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as e:
        log.warning("pg_trgm is not available (%s): content search stays a scan", e)
        return
    op.execute(
        "CREATE INDEX ix_tasks_content_trgm ON tasks"
        " USING gin ((CAST(content AS TEXT)) gin_trgm_ops)"
    )
    op.execute(
        "CREATE INDEX ix_tasks_external_id_trgm ON tasks USING gin (external_id gin_trgm_ops)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("tasks_search_update", "tasks_search_delete", "tasks_search_insert"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS tasks_search")
        return
    op.execute("DROP INDEX IF EXISTS ix_tasks_external_id_trgm")
    op.execute("DROP INDEX IF EXISTS ix_tasks_content_trgm")
