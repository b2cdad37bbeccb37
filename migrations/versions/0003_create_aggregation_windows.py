"""Aggregation windows, digest content, and scheduled/cancelled deliveries.

* ``aggregation_windows``: one row per open group (recipient, type, digest key) with
  its due time; beat's flush finds due groups by ``due_at`` alone.
* ``notifications.window_id``: the window a waiting notification belongs to.
* ``digests.html`` and ``digests.items``: the rendered HTML and every member's id,
  title, body and data.
* ``deliveries.status`` gains ``scheduled`` (held until quiet hours end or ``send_at``)
  and ``cancelled``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 16:20:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OLD_STATUSES = "'pending', 'queued', 'sending', 'sent', 'retrying', 'dead'"
_NEW_STATUSES = _OLD_STATUSES + ", 'scheduled', 'cancelled'"


def upgrade() -> None:
    op.create_table(
        "aggregation_windows",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("recipient_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("digest_key", sa.String(length=255), server_default="", nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latest_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("item_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_count", sa.Integer(), nullable=False),
        sa.Column("closed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aggregation_windows")),
    )
    op.create_index("ix_aggregation_windows_due_at", "aggregation_windows", ["due_at"])
    op.create_index(
        "ix_aggregation_windows_open", "aggregation_windows",
        ["recipient_id", "type", "digest_key"], postgresql_where=sa.text("NOT closed"),
    )
    op.add_column("notifications", sa.Column("window_id", sa.UUID(), nullable=True))
    op.create_index(
        "ix_notifications_window_id", "notifications", ["window_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column("digests", sa.Column("html", sa.Text(), nullable=True))
    op.add_column("digests", sa.Column(
        "items", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"),
        nullable=False,
    ))
    _replace_delivery_statuses(_NEW_STATUSES, "('pending', 'queued', 'retrying', 'scheduled')")


def downgrade() -> None:
    _replace_delivery_statuses(_OLD_STATUSES, "('pending', 'queued', 'retrying')")
    op.drop_column("digests", "items")
    op.drop_column("digests", "html")
    op.drop_index("ix_notifications_window_id", table_name="notifications")
    op.drop_column("notifications", "window_id")
    op.drop_table("aggregation_windows")


def _replace_delivery_statuses(statuses: str, due_statuses: str) -> None:
    op.drop_constraint(op.f("ck_deliveries_status"), "deliveries", type_="check")
    op.create_check_constraint("status", "deliveries", f"status IN ({statuses})")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.create_index(
        "ix_deliveries_due", "deliveries", ["next_attempt_at"],
        postgresql_where=sa.text(f"status IN {due_statuses}"),
    )
