"""Alembic environment: the URL comes from the notifier settings, not from alembic.ini."""

import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from notifier.settings import get_settings
from notifier.storage.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


#: Key of the session advisory lock every ``notifier db upgrade`` holds while it migrates.
MIGRATION_LOCK = 0x6E6F746D  # "notm"


def _take_lock(connection: Connection) -> None:
    """Take the migration lock, trying every half second. Not ``pg_advisory_lock``: a
    session blocked in it sits in a transaction, and ``CREATE INDEX CONCURRENTLY`` in
    the holder's migrations waits for every transaction to end: a deadlock."""
    while True:
        taken = connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}).scalar()
        connection.commit()
        if taken:
            return
        time.sleep(0.5)


def run_migrations_online() -> None:
    """Migrate under a session advisory lock, so that upgrades started at once (an init
    container per pod, a deploy job run twice) take turns: the second waits, then finds
    the database at head and does nothing. A session lock, not a transaction's: it must
    outlive the migrations' own commits (0007's ``autocommit_block``). Run migrations
    against Postgres itself or a session-mode pooler: a transaction-mode PgBouncer would
    hand the lock's server connection to others (docs/scaling.md)."""
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _take_lock(connection)
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
