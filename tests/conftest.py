"""Test run set-up: a database, a Redis db number and (on RabbitMQ) a virtual host of the
run's own, real workers.

The environment is set before anything imports notifier, because the settings (and the
Celery configuration made from them) are read once per process. Workers are real
``celery -A notifier worker`` processes started with the same environment.

``NOTIFIER_TEST_BROKER`` picks the broker of the run: ``redis`` (the default; the
claimed Redis db is the broker and the state Redis) or ``rabbitmq`` (a virtual host made
with ``rabbitmqctl`` for this run and deleted at its end; the claimed Redis db keeps the
breakers, rate limits and heartbeats). Tests that touch a broker carry the ``broker``
mark (:func:`pytest_collection_modifyitems`): ``pytest -m broker`` with
``NOTIFIER_TEST_BROKER=rabbitmq`` runs them all on RabbitMQ (``.ci/run`` does).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.brokers import TestBroker

_RUN_ID = uuid.uuid4().hex[:8]
SERVER_URL = os.environ.get("NOTIFIER_TEST_SERVER_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("NOTIFIER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("NOTIFIER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKER = os.environ.get("NOTIFIER_TEST_BROKER", "redis")
if BROKER not in ("redis", "rabbitmq"):
    raise SystemExit(f"NOTIFIER_TEST_BROKER: expected redis or rabbitmq, got {BROKER!r}")


def _claim_redis_db() -> int:
    """An empty Redis db number, claimed with a key so parallel runs pick different ones."""
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if client.dbsize() == 0 and client.set("notifier-test-claim", _RUN_ID, nx=True, ex=3600):
            return number
    raise RuntimeError(f"no empty Redis database at {REDIS_URL} for the tests")


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                          check=True)


def _make_vhost(vhost: str) -> None:
    """The run's own RabbitMQ virtual host, deleted when the run ends (whatever ends it)."""
    _rabbitmqctl("add_vhost", vhost)
    atexit.register(subprocess.run, ["rabbitmqctl", "delete_vhost", vhost],
                    capture_output=True, timeout=60)
    user = RABBITMQ_URL.split("//", 1)[1].split(":", 1)[0]
    _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")


REDIS_DB = _claim_redis_db()
DATABASE_URL = f"{SERVER_URL}/notifier_test_{_RUN_ID}"
#: The state Redis of the run (breakers, rate limits, heartbeats, failure counts); on
#: Redis runs also the broker.
STATE_REDIS_URL = f"{REDIS_URL}/{REDIS_DB}"
VHOST = f"notifier_test_{_RUN_ID}"
if BROKER == "rabbitmq":
    _make_vhost(VHOST)
    BROKER_URL = f"{RABBITMQ_URL}/{VHOST}"
    os.environ["NOTIFIER_REDIS_URL"] = STATE_REDIS_URL
else:
    BROKER_URL = STATE_REDIS_URL

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
def broker() -> Iterator[TestBroker]:
    """The run's broker, as the tests look into it (waiting messages, losing them)."""
    from tests.brokers import connect

    test_broker = connect(BROKER_URL)
    yield test_broker
    test_broker.close()
    state = redis.Redis.from_url(STATE_REDIS_URL)
    state.flushdb()
    state.close()


@pytest.fixture(autouse=True)
def clean_state(database: str, broker: TestBroker) -> Iterator[None]:
    """Every test starts with empty tables, empty queues and no state in Redis."""
    from notifier.storage.db import session_scope

    with session_scope() as session:
        session.connection().exec_driver_sql(
            "TRUNCATE notifications, deliveries, digests, dead_letters, idempotency_keys,"
            " recipients, inbox_messages, aggregation_windows, api_keys, suppressions,"
            " soft_bounces, callbacks, callback_secrets CASCADE"
        )
    broker.empty_queues()
    state = redis.Redis.from_url(STATE_REDIS_URL)
    for key in state.scan_iter("notifier.*"):  # breakers, heartbeats (and Redis's queues)
        state.delete(key)
    state.set("notifier-test-claim", _RUN_ID, ex=3600)
    state.close()
    yield


#: Modules whose tests publish to or consume from the broker: their tests, and every test
#: that asks for the ``worker`` fixture, carry the ``broker`` mark.
BROKER_MODULES = frozenset({
    "tests/ops/test_cli.py", "tests/ops/test_flower.py", "tests/ops/test_health.py",
    "tests/ops/test_metrics.py", "tests/pipeline/test_claim_recovery.py",
    "tests/pipeline/test_delivery_bulk.py", "tests/pipeline/test_suppressions.py",
    "tests/pipeline/test_delivery_recovery.py", "tests/pipeline/test_flush_worker.py",
    "tests/storage/test_pgbouncer.py", "tests/test_bench_api.py",
    "tests/test_broker_topology.py", "tests/test_chaos.py", "tests/test_client.py",
    "tests/test_client_confirming.py", "tests/test_logs.py",
    "tests/worker/test_batch_sizing.py", "tests/worker/test_clocks.py",
    "tests/worker/test_critical_lane.py",
    "tests/worker/test_flush_loop.py", "tests/worker/test_hostile_input.py",
    "tests/worker/test_hostile_property.py", "tests/worker/test_recovery.py",
    "tests/worker/test_shutdown.py", "tests/worker/test_tasks.py",
})
_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = Path(str(item.fspath)).resolve().relative_to(_ROOT).as_posix()
        fixtures = getattr(item, "fixturenames", ())
        if module in BROKER_MODULES or "worker" in fixtures:
            item.add_marker(pytest.mark.broker)


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
