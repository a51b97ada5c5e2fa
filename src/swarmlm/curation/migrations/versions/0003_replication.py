"""Replication: the signed record log, record digests on replicated rows, task preference.

- ``replica_records``: every signed record this store holds (its own and its peers'), by
  digest, as the exact bytes that travel, so anti-entropy can re-serve them unchanged;
- ``record_digest`` on tasks and annotators and ``digest`` on annotations: which record a
  row came from; on task sets, the content hash of the definition (NULL: made before
  replication existed; backfilled on first use);
- ``tasks.preferred``: 1 for tasks this node serves first (its rendezvous share, or every
  task when not replicating); ``ix_tasks_open`` now walks preferred tasks first;
- ``annotators.origin``: public key of the node a replicated account came from (NULL: local).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OPEN_TASK_PREDICATE = "status = 'open' AND needed > n_annotations + n_leased"


def upgrade() -> None:
    op.create_table(
        "replica_records",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.add_column("task_sets", sa.Column("record_digest", sa.String(64), nullable=True))
    op.add_column("tasks", sa.Column("record_digest", sa.String(64), nullable=True))
    op.add_column("tasks", sa.Column("preferred", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("annotators", sa.Column("record_digest", sa.String(64), nullable=True))
    op.add_column("annotators", sa.Column("origin", sa.String(64), nullable=True))
    op.add_column("annotations", sa.Column("digest", sa.String(64), nullable=True))
    op.create_index("ix_annotations_digest", "annotations", ["digest"])
    op.create_index("ix_tasks_digest", "tasks", ["digest"])
    op.drop_index("ix_tasks_open", table_name="tasks")
    op.create_index(
        "ix_tasks_open",
        "tasks",
        ["task_set_id", "is_gold", "preferred", "n_annotations", "id"],
        sqlite_where=sa.text(OPEN_TASK_PREDICATE),
        postgresql_where=sa.text(OPEN_TASK_PREDICATE),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_open", table_name="tasks")
    op.create_index(
        "ix_tasks_open",
        "tasks",
        ["task_set_id", "is_gold", "n_annotations", "id"],
        sqlite_where=sa.text(OPEN_TASK_PREDICATE),
        postgresql_where=sa.text(OPEN_TASK_PREDICATE),
    )
    op.drop_index("ix_tasks_digest", table_name="tasks")
    op.drop_index("ix_annotations_digest", table_name="annotations")
    op.drop_column("annotations", "digest")
    op.drop_column("annotators", "origin")
    op.drop_column("annotators", "record_digest")
    op.drop_column("tasks", "preferred")
    op.drop_column("tasks", "record_digest")
    op.drop_column("task_sets", "record_digest")
    op.drop_table("replica_records")
