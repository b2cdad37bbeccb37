"""Inbox states: ``seen_at`` and ``archived_at`` beside ``read_at``.

A message moves only forward, unread -> seen -> read -> archived
(``notifier.pipeline.inbox``); each step stamps its own column and the ones before it
(reading a message also marks it seen, archiving also marks it read), so ``read_at IS
NULL`` still means "not read yet": the unread index and the read-message retention keep
working unchanged, and an archived message is purged like a read one. Rows read before
this revision have ``seen_at`` NULL; their state is read all the same (the most
advanced stamp decides), so nothing is backfilled.

No index is added: paging (keyset on ``created_at, id``) walks the existing
``(recipient_id, created_at)`` indexes, measured in docs/inbox.md. Two nullable columns
without a default rewrite nothing: instant on a big table.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 07:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inbox_messages",
                  sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("inbox_messages",
                  sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("inbox_messages", "archived_at")
    op.drop_column("inbox_messages", "seen_at")
