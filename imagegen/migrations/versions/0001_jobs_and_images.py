"""Jobs and images, as the SQLite-only releases left them.

A database those releases made already has both tables (its schema was versioned by PRAGMA
user_version); it is adopted as it is, so its queued jobs still run.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("jobs"):
        return
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("images", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("cache_key", sa.String(64)),
        sa.Column("callback_url", sa.Text),
    )
    op.create_index("jobs_status", "jobs", ["status", "created_at"])
    op.create_index("jobs_client", "jobs", ["client", "created_at"])
    op.create_index("jobs_cache", "jobs", ["cache_key", "status"])
    op.create_table(
        "images",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(32)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
    )
    op.create_index("images_created", "images", ["created_at"])
