"""Jobs' model and priority class as columns: a cluster worker takes the queued jobs of the models
it serves in the scheduling policy's order (imagegen/scheduling.py), and /metrics counts the queue
by model and class. Unfinished jobs get their model from their parameters; ended ones need none.

Revision ID: 0013
Revises: 0012
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("model", sa.Text))
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="1"))
        batch.create_index("ix_jobs_waiting", ["status", "model"])
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("params", sa.Text),
        sa.column("model", sa.Text),
    )
    connection = op.get_bind()
    unfinished = connection.execute(sa.select(jobs.c.id, jobs.c.params).where(jobs.c.status.in_(["queued", "running"])))
    for job_id, params in unfinished.all():
        model = json.loads(params)["model"]
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(model=model))
