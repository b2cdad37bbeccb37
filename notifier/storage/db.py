"""Connections to Postgres: one engine per process, friendly errors, database creation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from notifier.settings import ConfigError, get_settings, mask_url

_engines: dict[tuple[int, str], Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """The engine of this process: prefork children must never share a parent's pool."""
    url = url or get_settings().database_url
    key = (os.getpid(), url)
    if key not in _engines:
        _engines[key] = create_engine(
            url, pool_pre_ping=True, pool_size=5, max_overflow=5,
            connect_args={"connect_timeout": 5, "application_name": "notifier"},
        )
    return _engines[key]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    session = sessionmaker(get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def raw_cursor(session: Session) -> psycopg.Cursor[Any]:
    """A psycopg cursor in the session's transaction, for COPY and the bulk statements
    the pipeline writes in SQL (typed: SQLAlchemy types the driver's connection Any)."""
    driver = cast("psycopg.Connection[Any]", session.connection().connection.driver_connection)
    return driver.cursor()


def describe_db_error(exc: BaseException) -> str:
    """The gist of the driver's message, without the SQL and traceback noise.

    psycopg says 'connection failed: connection to server at "h", port 1 failed:
    Connection refused' on its first line; the last clause is the part worth showing.
    """
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    if not lines:
        return type(original).__name__
    return lines[0].rsplit(" failed: ", 1)[-1]


def check_database(url: str | None = None) -> None:
    """Fail with one line naming ``NOTIFIER_DATABASE_URL`` if Postgres does not answer."""
    url = url or get_settings().database_url
    # A throwaway connection: the worker checks before it forks, and its pool processes
    # must not inherit an open socket.
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError) as exc:
        raise _unreachable(url, exc) from None
    finally:
        engine.dispose()


def create_database_if_missing(url: str | None = None) -> bool:
    """Create the configured database from the server's ``postgres`` database.

    Returns True when it had to be created. Lets ``make run`` start on a fresh server.
    """
    url = make_url(url or get_settings().database_url)
    name = url.database
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            return not exists
    except (OperationalError, DBAPIError) as exc:
        raise _unreachable(url.render_as_string(hide_password=False), exc) from None
    finally:
        admin.dispose()


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"NOTIFIER_DATABASE_URL: cannot connect to {mask_url(url)}: {describe_db_error(exc)}"
    )
