"""The admin side: consensus confidence, data manager indexes and reviews.

- ``tasks.confidence``: posterior of the consensus label (backfilled from the agreement,
  which is what it is for every schema but single choice and pairwise);
- ``ix_tasks_set_agreement`` and ``ix_tasks_set_confidence``: the data manager sorts and
  filters by them at 100k tasks without a sort of the whole set;
- ``reviews``: one verdict per annotation (accepted, rejected, corrected).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("confidence", sa.Float(), nullable=True))
    op.execute("UPDATE tasks SET confidence = agreement")
    op.create_index("ix_tasks_set_agreement", "tasks", ["task_set_id", "agreement"])
    op.create_index("ix_tasks_set_confidence", "tasks", ["task_set_id", "confidence"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "task_id", sa.Integer(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "annotation_id",
            sa.Integer(),
            sa.ForeignKey("annotations.id", ondelete="SET NULL"),
            nullable=True,
            unique=True,
        ),
        sa.Column("annotator_id", sa.Integer(), sa.ForeignKey("annotators.id"), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), sa.ForeignKey("annotators.id"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("corrected", sa.JSON(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reviews_annotator", "reviews", ["annotator_id", "id"])
    op.create_index("ix_reviews_task", "reviews", ["task_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_reviews_task", table_name="reviews")
    op.drop_index("ix_reviews_annotator", table_name="reviews")
    op.drop_table("reviews")
    op.drop_index("ix_tasks_set_confidence", table_name="tasks")
    op.drop_index("ix_tasks_set_agreement", table_name="tasks")
    op.drop_column("tasks", "confidence")
