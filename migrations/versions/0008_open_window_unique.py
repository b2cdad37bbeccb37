"""One open aggregation window per group, enforced by a partial unique index.

Ingest used to serialise batches on a per-group advisory lock and then load, change and
write each group's open window row by row. With ``uq_aggregation_windows_open``
(unique on (recipient, type, digest key) among windows not ``closed``) one
``INSERT ... ON CONFLICT ... DO UPDATE`` upserts and counts every window of a batch, and
two batches that open the same group's window at once meet on the index: the second
waits for the first and then adds to its window. So a group never has two open windows,
and never two digests for one period.

A window past its due time that no flush has taken yet is marked ``closed`` by the
ingest that finds it (it stays due, the flush still takes it), so the index leaves room
for the group's next window. Older duplicates, which the advisory-lock code could leave
(an expired window beside its successor), are closed the same way before the index is
built.

``fillfactor = 50``: each upsert writes a new version of the window row; with free space
in the page the update stays HOT (no index entries for the new version).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 01:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        UPDATE aggregation_windows SET closed = true
        WHERE NOT closed AND id NOT IN (
            SELECT DISTINCT ON (recipient_id, type, digest_key) id FROM aggregation_windows
            WHERE NOT closed ORDER BY recipient_id, type, digest_key, opened_at DESC, id DESC
        )
        """
    )
    op.create_index(
        "uq_aggregation_windows_open", "aggregation_windows",
        ["recipient_id", "type", "digest_key"], unique=True,
        postgresql_where=sa.text("NOT closed"),
    )
    op.drop_index("ix_aggregation_windows_open", table_name="aggregation_windows")
    op.execute("ALTER TABLE aggregation_windows SET (fillfactor = 50)")


def downgrade() -> None:
    op.execute("ALTER TABLE aggregation_windows RESET (fillfactor)")
    op.create_index(
        "ix_aggregation_windows_open", "aggregation_windows",
        ["recipient_id", "type", "digest_key"], postgresql_where=sa.text("NOT closed"),
    )
    op.drop_index("uq_aggregation_windows_open", table_name="aggregation_windows")
