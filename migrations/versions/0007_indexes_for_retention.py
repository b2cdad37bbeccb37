"""Indexes for retention (``notifier.purge_expired``): digests' members, read inbox
messages, digests by age.

Measured on 400,000 notifications and deliveries, 50,000 digests, 400,000 inbox
messages (docs/retention.md):

* ``notifications (digest_id)``: deleting a digest makes Postgres check that no
  notification still points at it (the foreign key), and the purge asks the same; with
  no index each is a scan of ``notifications``: 12 s for a batch of 100 digests, 57 ms
  for 1,000 with it.
* ``inbox_messages (read_at)``, read ones only: the read-message purge otherwise scans
  the whole inbox every run (100 ms at 240,000 messages, growing with the inbox).
* ``digests (created_at)``: the digest purge otherwise walks the whole
  (recipient, created_at) index.

Built ``CONCURRENTLY`` (outside the migration's transaction), so a running pipeline is
never blocked while they build on a large table.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 18:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_notifications_digest_id", "notifications", ["digest_id"], "digest_id IS NOT NULL"),
    ("ix_inbox_messages_read_at", "inbox_messages", ["read_at"], "read_at IS NOT NULL"),
    ("ix_digests_created_at", "digests", ["created_at"], None),
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, columns, where in _INDEXES:
            op.create_index(
                name, table, columns, if_not_exists=True, postgresql_concurrently=True,
                postgresql_where=sa.text(where) if where else None,
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, _, _ in _INDEXES:
            op.drop_index(name, table_name=table, if_exists=True,
                          postgresql_concurrently=True)
