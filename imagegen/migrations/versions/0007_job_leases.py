"""Job leases: a running job's owner holds it until its lease ends; a queued job's last publish.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_until", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("published_at", sa.Float))
