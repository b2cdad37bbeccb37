"""Add deliveries.provider: which of its channel's providers sent a delivery.

A channel may list several providers in order of preference and fail over between them
(``notifier.channels.get_providers``); the provider's name (``1:smtp.backup.example:587``:
its place in the list and its host, never a credential) is written with the ``sent``
status, in the same bulk statement. Nullable: rows sent before this revision, and rows
not sent yet, have none. Adding a nullable column without a default rewrites nothing.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("provider", sa.String(length=100), nullable=True))


def downgrade() -> None:
    op.drop_column("deliveries", "provider")
