"""A counter of changes to what routing reads from recipients, for per-process caches.

Ingest routes every notification by its recipient's preferences, time zone and name;
reading them for every batch cost a query and a validation per recipient. Each worker
process now keeps them (``notifier.pipeline.routing.RecipientStates``) and, in the
statement that reads them, reads ``preferences_generation.generation`` too. Triggers
bump it in the transaction of any change to those columns (``set_preferences``, an
inline recipient, hand-written SQL), any delete, any truncate: a batch that starts after
such a change commits sees a new generation and drops its cache. So a cache is never
stale once ``set_preferences`` has returned and committed.

Each bump takes the next value of a sequence, which a rolled-back transaction never gives
back: a process that read its own transaction's change (an inline recipient's new time
zone) and then rolled back holds a generation no committed row will ever show again. The
sequence starts at a random value, so a cache kept across a database that was dropped
and made again (tests, the benchmark) does not meet the same generation by chance.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 01:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_CHANGED = (
    "OLD.preferences IS DISTINCT FROM NEW.preferences"
    " OR OLD.timezone IS DISTINCT FROM NEW.timezone OR OLD.name IS DISTINCT FROM NEW.name"
)


def upgrade() -> None:
    op.create_table(
        "preferences_generation",
        sa.Column("id", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id", name=op.f("ck_preferences_generation_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preferences_generation")),
    )
    op.execute("CREATE SEQUENCE preferences_generation_seq")
    op.execute("SELECT setval('preferences_generation_seq', (random() * 2 ^ 52)::bigint)")
    op.execute(
        "INSERT INTO preferences_generation (generation)"
        " VALUES (nextval('preferences_generation_seq'))"
    )
    op.execute(
        """
        CREATE FUNCTION bump_preferences_generation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE preferences_generation
            SET generation = nextval('preferences_generation_seq');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER recipients_routing_changed AFTER UPDATE ON recipients FOR EACH ROW"
        f" WHEN ({_CHANGED}) EXECUTE FUNCTION bump_preferences_generation()"
    )
    for event in ("DELETE", "TRUNCATE"):
        op.execute(
            f"CREATE TRIGGER recipients_{event.lower()}d AFTER {event} ON recipients"
            " FOR EACH STATEMENT EXECUTE FUNCTION bump_preferences_generation()"
        )


def downgrade() -> None:
    for name in ("recipients_routing_changed", "recipients_deleted", "recipients_truncated"):
        op.execute(f"DROP TRIGGER {name} ON recipients")
    op.execute("DROP FUNCTION bump_preferences_generation()")
    op.drop_table("preferences_generation")
    op.execute("DROP SEQUENCE preferences_generation_seq")
