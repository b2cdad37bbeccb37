"""Status callbacks out: a notification's ``callback_url``, the callbacks outbox.

A notification may name a ``callback_url`` (an API key may carry a default): each
terminal status of each of its deliveries is POSTed there (docs/callbacks.md).

- ``notifications.callback_url`` and ``api_keys.callback_url``: nullable, nothing
  rewritten (instant on a big table).
- ``deliveries.callback``: true when its notification (or, for a digest, one of its
  members) has a callback URL, set when the delivery row is written. A constant
  default, so adding it rewrites nothing.
- ``callbacks``: the outbox of events to POST, one per (delivery, status, notification)
  (the unique index: a status written twice, or a replayed dead letter dying again,
  produces one event; a digest's delivery makes one for each member that names a
  callback URL). ``url`` is copied from the notification when the event is made, so retention
  purging the notification does not strand its callbacks.
- A trigger on ``deliveries`` writes the event **in the transaction that set the
  status**, whichever code set it (the delivery step's bulk outcome, a receipt, a
  cancel, a suppression): it cannot be lost, nor written without the status. Its
  ``WHEN`` reads only the new row (``callback`` first), so for a delivery without a
  callback URL Postgres evaluates one boolean and calls nothing: no cost for the rest.
  The statuses are ``FINISHED_DELIVERY_STATUSES`` as of this revision (a test holds
  the trigger to the constant: a new finished status needs a migration, as 0014 was).
- ``callback_secrets``: the signing secret of each receiving origin
  (``scheme://host:port``), made on first use.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 13:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

#: ``FINISHED_DELIVERY_STATUSES`` when this revision was written.
_FINISHED = ("'sent', 'delivered', 'bounced', 'complained', 'undeliverable', 'dead',"
             " 'cancelled', 'suppressed'")

EVENT_FUNCTION = """
CREATE FUNCTION notifier_callback_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.notification_id IS NOT NULL THEN
        INSERT INTO callbacks (id, delivery_id, notification_id, channel, status, detail,
                               url)
        SELECT gen_random_uuid(), NEW.id, n.id, NEW.channel, NEW.status,
               left(coalesce(NEW.provider_detail, NEW.last_error), 500), n.callback_url
        FROM notifications n
        WHERE n.id = NEW.notification_id AND n.callback_url IS NOT NULL
        ON CONFLICT (delivery_id, status, notification_id) DO NOTHING;
    ELSE
        -- A digest's delivery: one event for each member that names a callback URL.
        INSERT INTO callbacks (id, delivery_id, notification_id, channel, status, detail,
                               url)
        SELECT gen_random_uuid(), NEW.id, n.id, NEW.channel, NEW.status,
               left(coalesce(NEW.provider_detail, NEW.last_error), 500), n.callback_url
        FROM notifications n
        WHERE n.digest_id = NEW.digest_id AND n.callback_url IS NOT NULL
        ON CONFLICT (delivery_id, status, notification_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.add_column("notifications", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("api_keys", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("deliveries", sa.Column("callback", sa.Boolean(),
                                          server_default=sa.text("false"), nullable=False))
    op.create_table(
        "callbacks",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("delivery_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("notification_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True),
                  server_default=sa.text("now()"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True),
                  server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True),
                  server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callbacks")),
        sa.CheckConstraint(
            "state IN ('pending', 'queued', 'sending', 'retrying', 'sent', 'dead')",
            name=op.f("ck_callbacks_state")),
    )
    op.create_index("uq_callbacks_delivery_id_status_notification_id", "callbacks",
                    ["delivery_id", "status", "notification_id"], unique=True)
    op.create_index("ix_callbacks_due", "callbacks", ["next_attempt_at"],
                    postgresql_where=sa.text(
                        "state IN ('pending', 'queued', 'sending', 'retrying')"))
    op.create_index("ix_callbacks_updated_at", "callbacks", ["updated_at"])
    op.create_table(
        "callback_secrets",
        sa.Column("origin", sa.String(length=300), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.PrimaryKeyConstraint("origin", name=op.f("pk_callback_secrets")),
    )
    op.execute(EVENT_FUNCTION)
    op.execute(
        "CREATE TRIGGER callback_event AFTER UPDATE OF status ON deliveries FOR EACH ROW"
        f" WHEN (NEW.callback AND NEW.status IN ({_FINISHED})"
        " AND OLD.status IS DISTINCT FROM NEW.status)"
        " EXECUTE FUNCTION notifier_callback_event()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER callback_event ON deliveries")
    op.execute("DROP FUNCTION notifier_callback_event()")
    op.drop_table("callback_secrets")
    op.drop_table("callbacks")
    op.drop_column("deliveries", "callback")
    op.drop_column("api_keys", "callback_url")
    op.drop_column("notifications", "callback_url")
