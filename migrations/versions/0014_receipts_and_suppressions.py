"""Receipts and suppressions: provider-confirmed statuses, the suppression list.

What a provider says after it accepted a message (docs/receipts.md) moves a ``sent``
delivery forward: ``delivered``, ``bounced``, ``complained`` or ``undeliverable`` (the
provider's own "failed", kept apart from our ``dead``: we gave up there, the provider
gave up here). ``suppressed`` ends a delivery to an address on the suppression list
without an attempt. Two nullable columns on ``deliveries`` keep the provider's reason
and the time of its event (nothing rewritten: instant on a big table).

``suppressions``: one row per (channel, normalized address), with why and what put it
there. ``soft_bounces``: one row per soft-bounced delivery while it counts (the
window), so that N of them for one address suppress it; keyed by delivery, so a
replayed event counts once.

The status check is replaced (a brief ``ACCESS EXCLUSIVE`` lock while Postgres checks
every row: the new list holds the old one, so no row fails it).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 10:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_OLD = "'pending', 'queued', 'sending', 'sent', 'retrying', 'scheduled', 'dead', 'cancelled'"
_NEW = _OLD + ", 'delivered', 'bounced', 'complained', 'undeliverable', 'suppressed'"


def upgrade() -> None:
    _replace_statuses(_NEW)
    op.add_column("deliveries", sa.Column("provider_status_at", sa.DateTime(timezone=True),
                                          nullable=True))
    op.add_column("deliveries", sa.Column("provider_detail", sa.String(length=500),
                                          nullable=True))
    op.create_table(
        "suppressions",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("delivery_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
    )
    op.create_index("uq_suppressions_channel_address", "suppressions",
                    ["channel", "address"], unique=True)
    op.create_index("ix_suppressions_created_at", "suppressions", ["created_at"])
    op.create_table(
        "soft_bounces",
        sa.Column("delivery_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_soft_bounces")),
    )
    op.create_index("ix_soft_bounces_channel_address_at", "soft_bounces",
                    ["channel", "address", "at"])
    op.create_index("ix_soft_bounces_at", "soft_bounces", ["at"])


def downgrade() -> None:
    op.drop_table("soft_bounces")
    op.drop_table("suppressions")
    op.drop_column("deliveries", "provider_detail")
    op.drop_column("deliveries", "provider_status_at")
    # Rows in a status the old list lacks go back to the nearest it has.
    op.execute("UPDATE deliveries SET status = 'sent'"
               " WHERE status IN ('delivered', 'bounced', 'complained', 'undeliverable')")
    op.execute("UPDATE deliveries SET status = 'cancelled' WHERE status = 'suppressed'")
    _replace_statuses(_OLD)


def _replace_statuses(statuses: str) -> None:
    op.drop_constraint(op.f("ck_deliveries_status"), "deliveries", type_="check")
    op.create_check_constraint("status", "deliveries", f"status IN ({statuses})")
