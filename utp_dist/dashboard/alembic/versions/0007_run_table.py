"""the run table: run_values (every config key and metric of a run, indexed for SQL filters and sorts), run_tags,
display names, notes, descriptions and the archived flags

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_values",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("num", sa.Float(), nullable=True),
        sa.Column("text", sa.String(500), nullable=True),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_run_values_key_num", "run_values", ["key", "num", "run_id"])
    op.create_index("ix_run_values_key_text", "run_values", ["key", "text", "run_id"])
    op.create_table(
        "run_tags",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_run_tags_tag", "run_tags", ["tag"])
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("display_name", sa.String(255), nullable=True))
        batch_op.add_column(sa.Column("notes", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index("ix_runs_archived", ["archived"], unique=False)
    with op.batch_alter_table("configs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("description", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    for table in ("projects", "configs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("archived")
            if table == "configs":
                batch_op.drop_column("description")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_archived")
        for column in ("archived", "notes", "display_name"):
            batch_op.drop_column(column)
    op.drop_table("run_tags")
    op.drop_table("run_values")
