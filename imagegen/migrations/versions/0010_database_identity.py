"""The database's identity: a random id made once, which the image store it writes to records, so
an instance with another database that points at the same IMAGE_DIR is refused at start (each
would sweep the other's images as files no record names).

Revision ID: 0010
Revises: 0009
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    table = op.create_table("identity", sa.Column("id", sa.String(32), primary_key=True))
    op.bulk_insert(table, [{"id": uuid.uuid4().hex}])
