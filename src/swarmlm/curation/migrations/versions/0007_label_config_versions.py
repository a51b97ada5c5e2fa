"""Versioned label configurations: a task set's label schema can be edited after creation.

- ``label_configs``: every version of every set's label schema (version 1 is the schema the
  set was created with; later versions come from an edit here or a replicated
  ``label_config`` record, identified by that record's digest);
- ``task_sets.config_version`` / ``config_digest``: the version in force and the record
  digest it came from (NULL while the set still has its first schema). Worker processes
  key their parsed-schema cache by ``(set, config_digest)``, so an edit made by one process
  is seen by all of them at their next transaction;
- ``annotations.config_version``: the version an annotation was validated against.

Existing sets get their schema as version 1; existing annotations are version 1.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "task_sets",
        sa.Column("config_version", sa.Integer(), nullable=False, server_default="1"),
    )
    op.add_column("task_sets", sa.Column("config_digest", sa.String(64), nullable=True))
    op.add_column(
        "annotations",
        sa.Column("config_version", sa.Integer(), nullable=False, server_default="1"),
    )
    op.create_table(
        "label_configs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("task_set_id", sa.Integer(), sa.ForeignKey("task_sets.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("label_schema", sa.JSON(), nullable=False),
        sa.Column("record_digest", sa.String(64), nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_label_configs_set_version", "label_configs", ["task_set_id", "version"])
    op.execute(
        "INSERT INTO label_configs (task_set_id, version, label_schema, record_digest,"
        " created_at) SELECT id, 1, label_schema, NULL, created_at FROM task_sets"
    )


def downgrade() -> None:
    op.drop_index("ix_label_configs_set_version", table_name="label_configs")
    op.drop_table("label_configs")
    op.drop_column("annotations", "config_version")
    op.drop_column("task_sets", "config_digest")
    op.drop_column("task_sets", "config_version")
