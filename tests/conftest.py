"""Test run set-up: a database and a Redis db number of the run's own, real workers.

The environment is set before anything imports notifier, because the settings (and the
Celery configuration made from them) are read once per process. Workers are real
``celery -A notifier worker`` processes started with the same environment.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import redis

_RUN_ID = uuid.uuid4().hex[:8]
SERVER_URL = os.environ.get("NOTIFIER_TEST_SERVER_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("NOTIFIER_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _claim_redis_db() -> int:
    """An empty Redis db number, claimed with a key so parallel runs pick different ones."""
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if client.dbsize() == 0 and client.set("notifier-test-claim", _RUN_ID, nx=True, ex=3600):
            return number
    raise RuntimeError(f"no empty Redis database at {REDIS_URL} for the tests")


REDIS_DB = _claim_redis_db()
DATABASE_URL = f"{SERVER_URL}/notifier_test_{_RUN_ID}"
BROKER_URL = f"{REDIS_URL}/{REDIS_DB}"

os.environ.update({
    "NOTIFIER_DATABASE_URL": DATABASE_URL,
    "NOTIFIER_BROKER_URL": BROKER_URL,
    # A killed worker's messages come back after this many seconds (one hour by default
    # in Redis, five minutes in notifier): short, so the SIGKILL tests finish quickly.
    "NOTIFIER_VISIBILITY_TIMEOUT": "4",
    "NOTIFIER_UNACKED_RESTORE_INTERVAL": "1",
    "NOTIFIER_INGEST_COMMIT_ATTEMPTS": "2",
    # Retries and sweeps on a test's time scale: waits up to 2 s ride on countdowns
    # (below the visibility timeout), the sweeper runs every second.
    "NOTIFIER_RETRY_COUNTDOWN_MAX": "2",
    "NOTIFIER_SWEEP_INTERVAL": "1",
    "NOTIFIER_QUEUED_TIMEOUT": "3",
    "NOTIFIER_SENDING_TIMEOUT": "6",
    "NOTIFIER_BREAKER_OPEN_SECONDS": "2",
    "NOTIFIER_ALLOW_PRIVATE_TARGETS": "1",
    # Prometheus values of this run's processes only (workers and the test process).
    "NOTIFIER_METRICS_DIR": tempfile.mkdtemp(prefix=f"notifier-test-metrics-{_RUN_ID}-"),
})


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    """The run's own database at Alembic head, dropped at the end."""
    from sqlalchemy import create_engine, text

    from notifier.storage import migrate

    migrate.upgrade(DATABASE_URL)
    yield DATABASE_URL
    from notifier.storage.db import _engines

    for engine in _engines.values():
        engine.dispose()
    admin = create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "notifier_test_{_RUN_ID}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER_URL)
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(autouse=True)
def clean_state(database: str, broker: redis.Redis) -> Iterator[None]:
    """Every test starts with empty tables and empty queues."""
    from notifier.storage.db import session_scope

    with session_scope() as session:
        session.connection().exec_driver_sql(
            "TRUNCATE notifications, deliveries, digests, dead_letters, idempotency_keys,"
            " recipients, inbox_messages, aggregation_windows CASCADE"
        )
    for key in broker.scan_iter("notifier.*"):
        broker.delete(key)
    broker.set("notifier-test-claim", _RUN_ID, ex=3600)
    yield


@pytest.fixture
def worker() -> Iterator[object]:
    """A real worker process consuming every priority queue, stopped after the test."""
    from tests.workers import WorkerProcess

    process = WorkerProcess.start()
    yield process
    process.stop()


@pytest.fixture
def smtp_server() -> Iterator[object]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1, stopped after the test."""
    from tests.smtp_server import SmtpServer

    with SmtpServer() as server:
        yield server
