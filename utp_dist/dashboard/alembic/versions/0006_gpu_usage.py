"""gpus.util, gpus.memory_used_mb: what each GPU of an agent was doing at its latest heartbeat

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.add_column(sa.Column("util", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("memory_used_mb", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gpus", schema=None) as batch_op:
        batch_op.drop_column("memory_used_mb")
        batch_op.drop_column("util")
