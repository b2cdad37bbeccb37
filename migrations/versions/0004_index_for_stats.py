"""Indexes for `notifier stats`: notifications by creation time, deliveries by status
and last change.

``notifier stats --since 1h`` counts the notifications stored and the deliveries that
changed in a window back from now; without these it reads whole tables (60-80 ms per
400,000 rows, growing). ``(status, updated_at)`` replaces the index on ``status``
alone, which it serves as well.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 17:10:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_notifications_created_at", "notifications", ["created_at"])
    op.drop_index("ix_deliveries_status", table_name="deliveries")
    op.create_index("ix_deliveries_status_updated_at", "deliveries", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_status_updated_at", table_name="deliveries")
    op.create_index("ix_deliveries_status", "deliveries", ["status"])
    op.drop_index("ix_notifications_created_at", table_name="notifications")
