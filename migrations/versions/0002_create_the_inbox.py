"""Create inbox_messages, the in-app channel's inbox (read and unread per recipient).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 16:05:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox_messages",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("recipient_id", sa.String(length=255), nullable=False),
        sa.Column("notification_id", sa.UUID(), nullable=True),
        sa.Column("digest_id", sa.UUID(), nullable=True),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column(
            "data", postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'"), nullable=False,
        ),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_messages")),
    )
    op.create_index(
        "ix_inbox_messages_recipient_id_created_at", "inbox_messages",
        ["recipient_id", "created_at"],
    )
    op.create_index(
        "ix_inbox_messages_unread", "inbox_messages", ["recipient_id", "created_at"],
        postgresql_where=sa.text("read_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("inbox_messages")
