"""Recovery: a worker killed with SIGKILL mid-batch loses nothing and doubles nothing.

On Redis the kill comes once the worker holds every message and is writing batches,
the window our code owns; the instant of taking a message (kombu's stock transport
loses one killed there, ours does not) is tested in tests/test_broker_redis.py. On
RabbitMQ, which hands out messages atomically, the kill comes at any moment.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from notifier import client
from tests.brokers import foreign_producer
from tests.conftest import BROKER, BROKER_URL
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_rows

pytestmark = pytest.mark.slow

MESSAGES, PER_MESSAGE = 40, 500


def _batch() -> list[dict[str, object]]:
    return [
        {"recipient": "user-1", "type": "report", "title": "load", "data": {"pad": "x" * 200}}
        for _ in range(PER_MESSAGE)
    ]


def _kill_mid_ingest_then_recover(ready_to_kill, env: dict[str, str] | None = None) -> None:
    total = MESSAGES * PER_MESSAGE
    first = WorkerProcess.start(env={"NOTIFIER_INGEST_BATCH_SIZE": "2000", **(env or {})})
    wait_for(lambda: count_rows() > 0 and ready_to_kill(), timeout=60, what="a batch in flight")
    first.kill()
    assert count_rows() < total, "the kill came too late to test anything"
    second = WorkerProcess.start(env=env)
    try:
        wait_for_rows(total, timeout=60)
        time.sleep(1)  # anything redelivered twice would land now
        assert count_rows() == total
        assert count_rows("SELECT count(DISTINCT id) FROM notifications") == total
    finally:
        second.stop()


@pytest.mark.skipif(BROKER != "redis", reason="Redis's own window; RabbitMQ's test is below")
def test_sigkill_on_redis_mid_batch():
    """Redis: the killed worker's reserved messages come back after the visibility timeout."""
    for _ in range(MESSAGES):
        client.notify_many(_batch())
    broker = redis.Redis.from_url(BROKER_URL)

    def every_message_reserved_or_stored() -> bool:
        # Not one message between the list and the worker's unacked record.
        reserved = broker.hlen("unacked") * PER_MESSAGE
        return (
            broker.llen("notifier.normal") == 0
            and reserved + count_rows() >= MESSAGES * PER_MESSAGE
        )

    _kill_mid_ingest_then_recover(every_message_reserved_or_stored)


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ virtual host of the test's own, where rabbitmqctl can make one."""
    if not shutil.which("rabbitmqctl"):
        pytest.skip("rabbitmqctl is not available")
    vhost = f"notifier_test_{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(
            ["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True, timeout=30
        )
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"no RabbitMQ virtual host for the test: {exc}")
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=30)


def test_sigkill_on_rabbitmq_at_any_moment(rabbitmq_url):
    """RabbitMQ: a worker killed while it consumes and writes loses nothing."""
    producer = foreign_producer("producer", rabbitmq_url)
    for _ in range(MESSAGES):
        producer.send_task("notifier.ingest", args=[_batch()], queue="notifier.normal")
    producer.close()
    _kill_mid_ingest_then_recover(lambda: True, env={"NOTIFIER_BROKER_URL": rabbitmq_url})
