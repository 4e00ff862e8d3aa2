"""Job previews: the step of a running job's latest preview (0: none yet), which its worker stores
in the image storage for the API to serve.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("preview_step", sa.Integer, nullable=False, server_default="0"))
