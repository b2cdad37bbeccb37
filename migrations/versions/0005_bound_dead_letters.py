"""Bounded dead letters: a payload prefix with the original's size and SHA-256.

A dead letter keeps at most ``NOTIFIER_DEAD_LETTER_PAYLOAD_BYTES`` of its payload's
JSON; these columns say how big the original was, identify it, and mark a truncated
payload (which ``dead-letters replay`` refuses). Rows written before this revision
keep their whole payload: their size is left NULL and they are not truncated.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 18:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("payload_bytes", sa.BigInteger(), nullable=True))
    op.add_column("dead_letters", sa.Column("payload_sha256", sa.String(64), nullable=True))
    op.add_column(
        "dead_letters",
        sa.Column("payload_truncated", sa.Boolean(), nullable=False,
                  server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("dead_letters", "payload_truncated")
    op.drop_column("dead_letters", "payload_sha256")
    op.drop_column("dead_letters", "payload_bytes")
