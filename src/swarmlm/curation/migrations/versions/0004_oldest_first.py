"""The lease queue serves the oldest task first among equals (it served the newest).

``ix_tasks_open`` keeps its columns, with ``id`` descending: a backward walk then yields
preferred first, most annotations first, and among those the lowest id (the oldest task),
the order the documentation promises, still without a sort.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OPEN_TASK_PREDICATE = "status = 'open' AND needed > n_annotations + n_leased"


def _queue_index(id_column: sa.ColumnElement[object] | str) -> None:
    op.create_index(
        "ix_tasks_open",
        "tasks",
        ["task_set_id", "is_gold", "preferred", "n_annotations", id_column],
        sqlite_where=sa.text(OPEN_TASK_PREDICATE),
        postgresql_where=sa.text(OPEN_TASK_PREDICATE),
    )


def upgrade() -> None:
    op.drop_index("ix_tasks_open", table_name="tasks")
    _queue_index(sa.literal_column("id").desc())


def downgrade() -> None:
    op.drop_index("ix_tasks_open", table_name="tasks")
    _queue_index("id")
