"""Job warnings: what a job's run changed of its request without refusing it (a prompt past the
family's text encoder cut at its maximum), shown with the job's result.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("warnings", sa.Text))
