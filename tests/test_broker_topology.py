"""How our queues are declared on each broker (``notifier/broker_topology.py``), and on a
real RabbitMQ what quorum queues give: a delivery limit whose overflow lands where
operators see it, countdowns held by the broker, publishes the broker confirms.

The RabbitMQ tests run in the RabbitMQ pass of the suite (``NOTIFIER_TEST_BROKER=rabbitmq``,
``.ci/run``); those that change queue arguments or policies use a virtual host of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection
from sqlalchemy import text as sa_text

from notifier.broker_topology import (
    DEAD_LETTER_QUEUE,
    countdown,
    declare_queue,
    publish_options,
    transport_options,
    uses_quorum_queues,
)
from notifier.settings import Settings
from tests.conftest import BROKER, BROKER_URL, RABBITMQ_URL
from tests.workers import ROOT, wait_for

on_rabbitmq = pytest.mark.skipif(BROKER != "rabbitmq",
                                 reason="RabbitMQ's pass (NOTIFIER_TEST_BROKER=rabbitmq)")


def _settings(broker_url: str, **fields: object) -> Settings:
    return Settings(broker_url=broker_url, **fields)  # type: ignore[arg-type]


def test_redis_queues_are_declared_as_a_plain_celery_app_declares_them():
    """On Redis nothing changes: a direct exchange and routing key of the queue's name,
    no arguments, Redis's transport options, countdowns as given, no confirm timeout."""
    settings = _settings("redis://127.0.0.1:6379/0")
    queue = declare_queue("notifier.normal", settings)
    assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
        "notifier.normal", "direct", "notifier.normal")
    assert not queue.queue_arguments
    assert not uses_quorum_queues(settings)
    assert transport_options(settings)["queue_order_strategy"] == "priority"
    assert countdown(0.4, settings) == 0.4 and countdown(0, settings) is None
    assert publish_options(settings) == {}


def test_rabbitmq_queues_are_quorum_queues_with_a_limit_on_topic_exchanges():
    settings = _settings("amqp://guest:guest@127.0.0.1:5672//", broker_delivery_limit=7)
    queue = declare_queue("notifier.critical", settings)
    assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
        "notifier.critical", "topic", "notifier.critical")
    assert queue.queue_arguments == {
        "x-queue-type": "quorum", "x-delivery-limit": 7,
        "x-dead-letter-exchange": DEAD_LETTER_QUEUE,
        "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
    }
    assert transport_options(settings) == {"confirm_publish": True}
    assert publish_options(settings) == {"confirm_timeout": settings.broker_confirm_timeout}
    # Native delayed delivery counts whole seconds and refuses less than one.
    assert countdown(0.4, settings) == 1.0 and countdown(2.0, settings) == 2.0


def test_classic_queues_stay_available_on_rabbitmq():
    """``NOTIFIER_BROKER_QUEUE_TYPE=classic``: the declarations of before (a virtual host
    made by an older notifier keeps working until it is drained and moved)."""
    settings = _settings("amqp://guest:guest@127.0.0.1:5672//", broker_queue_type="classic",
                         broker_confirm_publish=False)
    queue = declare_queue("notifier.low", settings)
    assert (queue.exchange.type, queue.queue_arguments) == ("direct", None)
    assert transport_options(settings) == {"confirm_publish": False}
    assert publish_options(settings) == {}


# --- on a real RabbitMQ ------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60, check=True).stdout


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A virtual host of the test's own (its queues get other arguments or policies)."""
    vhost = f"notifier_test_{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        user = RABBITMQ_URL.split("//", 1)[1].split(":", 1)[0]
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{RABBITMQ_URL}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


def _queues(vhost: str) -> dict[str, tuple[str, dict[str, object]]]:
    """Queue name -> (type, arguments) as RabbitMQ lists them."""
    listing = _rabbitmqctl("list_queues", "-p", vhost, "--formatter", "json", "name", "type",
                           "arguments")
    return {row["name"]: (row["type"], {name: value for name, _, value in row["arguments"]})
            for row in json.loads(listing)}


@on_rabbitmq
def test_a_worker_declares_quorum_queues_and_the_delay_levels(worker):
    """Every queue a worker consumes is a quorum queue with the delivery limit and the
    dead-letter route; the dead-letter queue exists before anything can need it; the
    delay levels of native delayed delivery (quorum too) are there."""
    from notifier.settings import get_settings
    from notifier.worker.queues import ALL_QUEUES

    vhost = BROKER_URL.rsplit("/", 1)[1]
    queues = _queues(vhost)
    limit = get_settings().broker_delivery_limit
    for name in ALL_QUEUES:
        assert queues[name] == ("quorum", {
            "x-queue-type": "quorum", "x-delivery-limit": limit,
            "x-dead-letter-exchange": DEAD_LETTER_QUEUE,
            "x-dead-letter-routing-key": DEAD_LETTER_QUEUE}), name
    assert queues[DEAD_LETTER_QUEUE][0] == "quorum"
    delay_levels = [name for name in queues if name.startswith("celery_delayed_")]
    assert len(delay_levels) == 28 and {queues[n][0] for n in delay_levels} == {"quorum"}
    assert "Global QoS is disabled" in worker.log()


@on_rabbitmq
def test_a_message_past_its_delivery_limit_goes_to_the_dead_lettered_queue(own_vhost):
    """A message handed out and returned ``broker_delivery_limit`` times (a worker it
    kills, a consumer that always gives it back) is not handed out again: RabbitMQ moves
    it, headers and all, to ``notifier.dead-lettered``, where no worker consumes it."""
    settings = _settings(own_vhost, broker_delivery_limit=2)
    queue = declare_queue("notifier.normal", settings)
    with Connection(own_vhost) as connection:
        connection.Producer().publish(
            {"poison": True}, exchange=queue.exchange, routing_key=queue.routing_key,
            declare=[queue], headers={"task": "notifier.ingest", "id": "poison-1"})
        channel = connection.channel()
        returned = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = channel.basic_get("notifier.normal", no_ack=False)
            if message is None:
                if _ready(own_vhost, DEAD_LETTER_QUEUE):
                    break
                time.sleep(0.05)  # returned, not yet ready again
                continue
            channel.basic_reject(message.delivery_tag, requeue=True)
            returned += 1
        assert returned == 3  # the first delivery and two more: the limit of 2 redeliveries
        dead = channel.basic_get(DEAD_LETTER_QUEUE, no_ack=True)
        assert dead is not None and dead.headers["id"] == "poison-1"
        [death] = dead.headers["x-death"]
        assert death["queue"] == "notifier.normal" and death["reason"] == "delivery_limit"
        assert channel.basic_get("notifier.normal", no_ack=True) is None


def _ready(vhost_url: str, queue: str) -> int:
    with Connection(vhost_url) as connection:
        return int(connection.default_channel.queue_declare(queue, passive=True).message_count)


@on_rabbitmq
def test_a_countdown_waits_in_rabbitmq_not_in_the_worker(worker):
    """Delivery tasks published with a countdown (short retries) wait in the delay levels
    of native delayed delivery, not in the worker's memory (a quorum queue cannot hold a
    message back, and a worker holding it would block its prefetch); the worker gets
    them once the delay passed. Under a second rounds up to one (Celery refuses less)."""
    from kombu.transport.native_delayed_delivery import level_name

    from notifier.pipeline.outbox import DeliveryTask
    from notifier.worker.tasks import publish

    tasks = [DeliveryTask("console", "notifier.deliver.console", [str(uuid.uuid4())],
                          countdown=seconds) for seconds in (0.4, 3.0)]
    publish(tasks)
    waiting = sum(_ready(BROKER_URL, level_name(level)) for level in range(28))

    def received() -> int:
        return worker.log().count("Task notifier.deliver[")  # "received", "succeeded"

    assert waiting + received() // 2 == 2 and waiting >= 1
    wait_for(lambda: received() == 4, 30, "the worker to run both delayed tasks")
    assert sum(_ready(BROKER_URL, level_name(level)) for level in range(28)) == 0
    assert "Direct exchanges are not supported" not in worker.log()


_NOTIFY_SCRIPT = """
from notifier.client import notify
print(notify("u-1", "report", "refused?"), flush=True)
"""


@on_rabbitmq
def test_a_publish_the_broker_refuses_raises_instead_of_returning_an_id(own_vhost):
    """With publisher confirms (the default), ``notify()`` returns once RabbitMQ has the
    message and raises when it refuses it (here a policy that takes no more messages);
    without them the same call returns an id for a message that never existed."""
    vhost = own_vhost.rsplit("/", 1)[1]
    _rabbitmqctl("set_policy", "-p", vhost, "full", "^notifier\\.normal$",
                 '{"max-length": 0, "overflow": "reject-publish"}', "--apply-to", "queues")

    def notify(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _NOTIFY_SCRIPT], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={**os.environ, "NOTIFIER_BROKER_URL": own_vhost, **env})

    def policy_applied() -> bool:
        listing = _rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name",
                               "policy")
        return "notifier.normal\tfull" in listing

    unconfirmed = notify(NOTIFIER_BROKER_CONFIRM_PUBLISH="false")  # declares the queue
    assert unconfirmed.returncode == 0, unconfirmed.stderr
    wait_for(policy_applied, 30, "the policy on notifier.normal")
    lost = notify(NOTIFIER_BROKER_CONFIRM_PUBLISH="false")
    assert lost.returncode == 0 and uuid.UUID(lost.stdout.strip())
    refused = notify()
    assert refused.returncode != 0 and refused.stdout == ""
    assert "MessageNacked" in refused.stderr
    assert _ready(own_vhost, "notifier.normal") == 1  # the one sent before the policy


def test_critical_work_is_not_held_behind_a_bulk_backlog(worker):
    """Priorities by queue order, on either broker (on RabbitMQ quorum queues make the
    prefetch count per consumer, so a backlog of bulk messages cannot take the window of
    the critical queue): a critical notification sent behind 40 bulk messages of 500 is
    stored before they all are."""
    from notifier import client
    from notifier.storage.db import session_scope

    for start in range(40):
        client.notify_many([{"recipient": f"bulk-{start}-{i}", "type": "report",
                             "title": "bulk", "priority": "low"} for i in range(500)])
    note_id = client.notify("ops", "alert", "now", priority="critical")
    low_when_stored: list[int] = []

    def critical_stored() -> bool:
        with session_scope() as session:
            stored, low = session.execute(sa_text(
                "SELECT count(*) FILTER (WHERE id = :id), count(*) FILTER (WHERE priority = 'low')"
                " FROM notifications"), {"id": note_id}).one()
        if stored:
            low_when_stored.append(low)
        return bool(stored)

    wait_for(critical_stored, 60, "the critical notification")
    assert low_when_stored[0] < 20_000
