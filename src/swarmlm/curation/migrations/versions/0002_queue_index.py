"""Assignment queue index, lease counts, and the auth epoch.

- ``tasks.n_leased`` (leases currently held, backfilled from ``assignments``) and the partial
  index ``ix_tasks_open`` over tasks with a free slot, in offer order: leasing a task becomes
  a short index walk instead of a scan with a per-task count of live leases;
- ``ix_tasks_gold`` for honeypot picks (replaces ``ix_tasks_queue``);
- ``ix_assignments_leased_expiry``: finds expired leases for the sweep;
- ``auth_epoch``: bumped on every revocation so cached token and session lookups are dropped
  by every server process.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OPEN_TASK_PREDICATE = "status = 'open' AND needed > n_annotations + n_leased"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("n_leased", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE tasks SET n_leased = (SELECT count(*) FROM assignments "
        "WHERE assignments.task_id = tasks.id AND assignments.state = 'leased')"
    )
    op.drop_index("ix_tasks_queue", table_name="tasks")
    op.create_index(
        "ix_tasks_open",
        "tasks",
        ["task_set_id", "is_gold", "n_annotations", "id"],
        sqlite_where=sa.text(OPEN_TASK_PREDICATE),
        postgresql_where=sa.text(OPEN_TASK_PREDICATE),
    )
    op.create_index("ix_tasks_gold", "tasks", ["task_set_id", "is_gold", "id"])
    op.create_index(
        "ix_assignments_leased_expiry",
        "assignments",
        ["expires_at"],
        sqlite_where=sa.text("state = 'leased'"),
        postgresql_where=sa.text("state = 'leased'"),
    )
    op.create_table(
        "auth_epoch",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO auth_epoch (id, epoch) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("auth_epoch")
    op.drop_index("ix_assignments_leased_expiry", table_name="assignments")
    op.drop_index("ix_tasks_gold", table_name="tasks")
    op.drop_index("ix_tasks_open", table_name="tasks")
    op.create_index(
        "ix_tasks_queue", "tasks", ["task_set_id", "is_gold", "status", "n_annotations"]
    )
    op.drop_column("tasks", "n_leased")
