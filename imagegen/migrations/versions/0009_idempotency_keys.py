"""Idempotency keys: a job remembers the key its request carried and what the request was, so a
repeat within a day returns it instead of making another.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(255)))
        batch.add_column(sa.Column("fingerprint", sa.String(64)))
    op.create_index("ix_jobs_idempotency", "jobs", ["client", "idempotency_key"], unique=True)
