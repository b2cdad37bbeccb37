"""The key of the advisory lock that ties a claimed delivery to its claimant's life.

A worker that claims deliveries (``status = 'sending'``) holds ``pg_advisory_xact_lock``
on a key of its own, in a transaction kept open on a connection of its own while it
sends, and writes that key on the rows it claims. A worker that dies (SIGKILL, OOM, its
host or its Postgres connection gone) ends that transaction and frees the lock at once,
so the sweep and every later claim take its rows back as soon as they can take the lock
(``pg_try_advisory_xact_lock(claim_key)``), instead of after ``NOTIFIER_SENDING_TIMEOUT``.
Rows without a key (claimed before this revision) keep the old timeout.

Adding a nullable column without a default rewrites nothing: instant on a big table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 04:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("claim_key", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("deliveries", "claim_key")
