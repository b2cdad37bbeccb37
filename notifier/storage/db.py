"""Connections to Postgres: one engine per process, friendly errors, database creation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias, cast

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from notifier.settings import ConfigError, Settings, get_settings, mask_url

Cursor: TypeAlias = psycopg.Cursor[TupleRow]
"""A psycopg cursor inside a session's transaction: the bulk statements (``unnest`` over
arrays of thousands of rows) run on it, without the ORM's per-row cost."""

_engines: dict[tuple[int, str, int, bool], Engine] = {}


def connect_args(settings: Settings, application_name: str = "notifier") -> dict[str, Any]:
    """What psycopg is told on each connect. Only what a pooler in transaction mode
    passes on: PgBouncer refuses an ``options`` startup parameter, and forgets a
    prepared statement once the transaction ends (``database_prepared_statements``)."""
    args: dict[str, Any] = {"connect_timeout": 5, "application_name": application_name}
    if not settings.database_prepared_statements:
        args["prepare_threshold"] = None  # never prepare; psycopg's default is 5 runs
    return args


def get_engine(url: str | None = None, settings: Settings | None = None) -> Engine:
    """The engine of this process: prefork children must never share a parent's pool.

    At most ``database_pool_size`` connections, none beyond it (no overflow), so that
    processes x pool size is a bound on the Postgres connections of a fleet."""
    settings = settings or get_settings()
    url = url or settings.database_url
    key = (os.getpid(), url, settings.database_pool_size, settings.database_prepared_statements)
    engine = _engines.get(key)
    if engine is None:
        made = create_engine(
            url, pool_pre_ping=True, pool_size=settings.database_pool_size, max_overflow=0,
            connect_args=connect_args(settings),
        )
        # Two threads at once (a pool process's first job and its warm-up, API threads)
        # keep one engine: a second pool would hold connections beyond the bound.
        engine = _engines.setdefault(key, made)
        if engine is not made:
            made.dispose()  # never connected
    return engine


_session_makers: dict[Engine, sessionmaker[Session]] = {}


def _session_maker(engine: Engine) -> sessionmaker[Session]:
    """One sessionmaker per engine: each new one makes a Session subclass, whose event
    dispatch SQLAlchemy sets up again on first use (a tenth of an ingest batch's time)."""
    maker = _session_makers.get(engine)
    if maker is None:
        maker = _session_makers[engine] = sessionmaker(engine, expire_on_commit=False)
    return maker


@contextmanager
def session_scope(
    url: str | None = None, *, bounds: Settings | None = None,
    connection: Connection | None = None,
) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises; with
    ``bounds``, its transaction's idle and lock waits are bounded (``bound_transaction``).
    With ``connection`` (:func:`pooled_connection`) it runs on that one, which stays
    checked out after the commit; else on one of the pool's, returned at the end."""
    maker = _session_maker(get_engine(url))
    session = maker(bind=connection) if connection is not None else maker()
    try:
        if bounds is not None:
            bound_transaction(session, bounds)
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def pooled_connection(url: str | None = None) -> Iterator[Connection]:
    """One of the pool's connections, for a transaction (``session_scope(connection=…)``)
    and a statement after its commit (:func:`autocommit_cursor`): the pool checks a
    connection (``pool_pre_ping``) each time it hands one out, so a second checkout
    right after the commit would cost a round trip of its own."""
    with get_engine(url).connect() as connection:
        yield connection


def autocommit_cursor(connection: Connection) -> Cursor:
    """A cursor on ``connection`` (no transaction open on it) whose each statement is its
    own transaction: one round trip, where a transaction of one statement costs three
    (``BEGIN``, the statement, ``COMMIT``). The pool puts the connection back in
    transactions when it is returned (SQLAlchemy resets an isolation level set here)."""
    connection.execution_options(isolation_level="AUTOCOMMIT")
    return _driver(connection).cursor()


#: The settings ``bound_transaction`` sets, and the setting that gives each (seconds).
TRANSACTION_BOUNDS = (
    ("idle_in_transaction_session_timeout", "database_idle_timeout"),
    ("lock_timeout", "database_lock_timeout"),
)


def bound_transaction(session: Session, settings: Settings) -> None:
    """Bound the session's transaction, for itself alone: how long it may sit idle
    between statements (``NOTIFIER_DATABASE_IDLE_TIMEOUT``: past it Postgres ends the
    session, and its locks go) and how long a statement waits for a lock
    (``NOTIFIER_DATABASE_LOCK_TIMEOUT``: past it the statement fails). Both fail the
    transaction with an error ``worker.tasks.database_unavailable`` takes for Postgres
    being unusable, so the work is retried and nothing is counted against it.

    ``set_config(…, true)`` is ``SET LOCAL``: the setting ends with the transaction,
    never with the session, so a pooler in transaction mode (PgBouncer) hands nothing
    on, and the delivery claim's transaction on a pooled connection is never bounded
    by it. None of it if both are 0 (the server's own settings then apply).

    It costs no round trip of its own: psycopg would send ``BEGIN`` alone and wait for
    it, then the settings; here ``BEGIN``, the settings and the read of Postgres's clock
    (for ``transaction_now``) go as one simple query, and psycopg, finding the
    transaction begun, sends no ``BEGIN`` of its own. On two busy cores every round
    trip of a critical ingest batch is a wake-up of the worker and of its backend
    behind the bulk work (see ``docs/scaling.md``)."""
    values = [
        (name, max(1, round(seconds * 1000)))
        for name, field in TRANSACTION_BOUNDS
        if (seconds := getattr(settings, field))
    ]
    if not values:
        return
    connection = driver_connection(session)
    # Integers of our own settings, in milliseconds: nothing to quote.
    settings_sql = "".join(f", set_config('{name}', '{ms}ms', true)" for name, ms in values)
    clock_sql = "(extract(epoch FROM statement_timestamp()) * 1000000)::int8"
    if connection.pgconn.transaction_status == pq.TransactionStatus.IDLE:
        result = connection.pgconn.exec_(f"BEGIN; SELECT {clock_sql}{settings_sql}".encode())
    else:  # a statement already ran in this transaction (no caller does that today)
        result = connection.pgconn.exec_(f"SELECT {clock_sql}{settings_sql}".encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise psycopg.errors.error_from_result(result, encoding=connection.info.encoding)
    microseconds = int(result.get_value(0, 0) or b"")
    session.info[_SERVER_NOW] = _EPOCH + timedelta(microseconds=microseconds)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def driver_connection(session: Session) -> psycopg.Connection[TupleRow]:
    """The psycopg connection under the session, inside its transaction."""
    return _driver(session.connection())


def _driver(connection: Connection) -> psycopg.Connection[TupleRow]:
    driver: psycopg.Connection[TupleRow] | None = connection.connection.driver_connection
    if driver is None:  # only a connection already closed has none
        raise RuntimeError("the database connection is closed")
    return driver


def raw_cursor(session: Session) -> Cursor:
    """A psycopg cursor on the session's own connection, inside its transaction: for the
    pipeline's hand-written SQL (``executemany``, ``COPY``, row locks) that the ORM would
    only slow down. Commit and rollback stay the session's."""
    return driver_connection(session).cursor()


def libpq_url(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as libpq takes it (for psycopg's own
    connections, such as the inbox feed's ``LISTEN``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


#: Where a session keeps Postgres's clock once read (``transaction_now``).
_SERVER_NOW = "notifier.server_now"


def transaction_now(session: Session) -> datetime:
    """Postgres's clock for the session's transaction: the time ``bound_transaction``
    read with its settings, in the same round trip, or else read now (``server_now``).
    Ingest takes its batch's clock from here, so bounding its transaction and reading
    the time cost one round trip, not two."""
    known = session.info.get(_SERVER_NOW)
    if known is None:
        known = session.info[_SERVER_NOW] = server_now(raw_cursor(session))
    return cast(datetime, known)


def server_now(cursor: Cursor) -> datetime:
    """Postgres's clock, read once for a transaction's decisions: the one clock every
    time written to Postgres is taken from, so that hosts whose clocks differ agree on
    windows and due times (``docs/scaling.md``, Clocks)."""
    cursor.execute("SELECT statement_timestamp()")
    row = cursor.fetchone()
    if row is None:  # a SELECT without FROM always returns its row
        raise RuntimeError("Postgres returned no time")
    return cast(datetime, row[0])


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
    settings = get_settings()
    url = url or settings.database_url
    # A throwaway connection: the worker checks before it forks, and its pool processes
    # must not inherit an open socket.
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args(settings))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError) as exc:
        raise _unreachable(url, exc) from None
    finally:
        engine.dispose()


#: SQLSTATEs of a ``CREATE DATABASE`` that met the same database created meanwhile:
#: duplicate_database, unique_violation (pg_database's name index).
CREATED_MEANWHILE = frozenset({"42P04", "23505"})


def create_database_if_missing(url: str | None = None) -> bool:
    """Create the configured database from the server's ``postgres`` database.

    Returns True when it had to be created. Lets ``make run`` start on a fresh server.
    """
    target = make_url(url or get_settings().database_url)
    name = target.database
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
            if not exists:
                try:
                    connection.execute(text(f'CREATE DATABASE "{name}"'))
                except DBAPIError as exc:
                    # Another process created it meanwhile (two upgrades at once): Postgres
                    # says so as a duplicate database or, in a closer race, as a duplicate
                    # key in its catalog.
                    if getattr(exc.orig, "sqlstate", None) not in CREATED_MEANWHILE:
                        raise
                    return False
            return not exists
    except (OperationalError, DBAPIError) as exc:
        raise _unreachable(target.render_as_string(hide_password=False), exc) from None
    finally:
        admin.dispose()


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"NOTIFIER_DATABASE_URL: cannot connect to {mask_url(url)}: {describe_db_error(exc)}"
    )
