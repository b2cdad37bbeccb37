"""Inbox states: ``seen_at`` and ``archived_at`` beside ``read_at``.

A message moves only forward, unread -> seen -> read -> archived
(``notifier.pipeline.inbox``); each step stamps its own column and the ones before it
(reading a message also marks it seen, archiving also marks it read), so ``read_at IS
NULL`` still means "not read yet": the unread index and the read-message retention keep
working unchanged, and an archived message is purged like a read one. Rows read before
this revision have ``seen_at`` NULL; their state is read all the same (the most
advanced stamp decides), so nothing is backfilled.

One index, ``(recipient_id, created_at)`` of the messages not archived: the inbox's
default page (all but archived) otherwise walks every archived message newer than the
page (measured on 380,000 messages: 4.4 ms for a recipient who archives everything, with
20,000 archived, growing with them; 0.05 ms with it). Paging (keyset on
``created_at, id``) otherwise walks the existing ``(recipient_id, created_at)`` indexes
(docs/inbox.md). Two nullable columns without a default rewrite nothing: instant on a big
table; the index is built ``CONCURRENTLY``, so the pipeline is never blocked meanwhile.

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
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_inbox_messages_unarchived", "inbox_messages", ["recipient_id", "created_at"],
            if_not_exists=True, postgresql_concurrently=True,
            postgresql_where=sa.text("archived_at IS NULL"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_inbox_messages_unarchived", table_name="inbox_messages",
                      if_exists=True, postgresql_concurrently=True)
    op.drop_column("inbox_messages", "archived_at")
    op.drop_column("inbox_messages", "seen_at")
