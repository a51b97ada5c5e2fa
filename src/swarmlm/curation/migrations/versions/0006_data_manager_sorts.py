"""Indexes for the data manager's id and annotation-count sorts at 100k tasks.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_set_id", "tasks", ["task_set_id", "id"])
    op.create_index("ix_tasks_set_annotations", "tasks", ["task_set_id", "n_annotations"])


def downgrade() -> None:
    op.drop_index("ix_tasks_set_annotations", table_name="tasks")
    op.drop_index("ix_tasks_set_id", table_name="tasks")
