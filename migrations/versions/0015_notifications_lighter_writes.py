"""Lighter notification writes: no per-row recipient check, no index on status.

Measured on the benchmark's ingest workload (``make bench``'s ``in_process_ingest``):
the foreign key from ``notifications`` to ``recipients`` cost about 4 µs of Postgres's
~25 µs of CPU per notification (its check is a query and a row lock for every inserted
row), and ``ix_notifications_status`` about 2 µs (an entry per row in an index on a
column of seven values). Ingest in one process, quiet machine, four runs each, alternating
with the code before: 20,253 → 28,593 notifications/s (medians).

- **The foreign key** guarded nothing ingest does not already guarantee: ingest writes
  (or finds) every recipient in the same transaction as its notifications, and nothing
  in notifier deletes a recipient or changes its id. What the key also did, refuse an
  operator's ``DELETE`` or id change of a recipient that still has notifications, a
  trigger on ``recipients`` now does, at the cost of one index probe per deleted row,
  nothing on the write path. Unlike the key it cannot see notifications of a
  transaction not yet committed: a recipient deleted by hand in the very moment a batch
  for it commits leaves that batch's notifications without their recipient: a delivery
  on a channel that needs an address then fails as any recipient without one does
  ("recipient … has no email address"). Digests keep their key (written by the
  flush, a few per window).
- **The status index** served only ``notifier status``'s count by status, which now
  reads the table (pending ones have their own partial index).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 10:00:00
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

GUARD_FUNCTION = """
CREATE FUNCTION notifier_recipient_still_referenced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.id IS DISTINCT FROM OLD.id)
       AND EXISTS (SELECT 1 FROM notifications WHERE recipient_id = OLD.id) THEN
        RAISE EXCEPTION 'recipient % still has notifications', quote_literal(OLD.id)
            USING ERRCODE = 'foreign_key_violation',
                  HINT = 'delete its notifications first (docs/retention.md)';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$
"""


def upgrade() -> None:
    op.drop_constraint("fk_notifications_recipient_id_recipients", "notifications",
                       type_="foreignkey")
    op.drop_index("ix_notifications_status", table_name="notifications")
    op.execute(GUARD_FUNCTION)
    op.execute(
        "CREATE TRIGGER recipient_still_referenced BEFORE DELETE OR UPDATE OF id"
        " ON recipients FOR EACH ROW EXECUTE FUNCTION notifier_recipient_still_referenced()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER recipient_still_referenced ON recipients")
    op.execute("DROP FUNCTION notifier_recipient_still_referenced()")
    op.create_index("ix_notifications_status", "notifications", ["status"], unique=False)
    op.create_foreign_key("fk_notifications_recipient_id_recipients", "notifications",
                          "recipients", ["recipient_id"], ["id"])
