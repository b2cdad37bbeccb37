"""The producer API, checked by reading what it put on the real broker (no worker runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from notifier import client
from notifier.schemas import NotificationError
from tests.brokers import Envelope, TestBroker
from tests.workers import ROOT, wait_for


@pytest.fixture
def queues(broker: TestBroker) -> TestBroker:
    return broker


def _payloads(queues: TestBroker, priority: str) -> list[object]:
    """The first argument of every message waiting in a priority queue, oldest first."""
    payloads = []
    for envelope in queues.peek(f"notifier.{priority}"):
        assert envelope.headers["task"] == "notifier.ingest"
        assert "@" not in envelope.headers["argsrepr"]  # no contents in Flower or logs
        payloads.append(envelope.args()[0])
    return payloads


def test_notify_returns_the_id_at_once_and_routes_by_priority(queues):
    """notify() returns a UUIDv7 without waiting for a worker and uses the priority's queue."""
    note_id = client.notify("user-1", "alert", "Disk full", priority="high", data={"disk": "/"})
    assert uuid.UUID(note_id).version == 7
    [payload] = _payloads(queues, "high")
    [envelope] = queues.peek("notifier.high")
    assert envelope.headers["argsrepr"] == "[<1 notification>]"
    assert payload == {"id": note_id, "recipient": "user-1", "type": "alert",
                       "title": "Disk full", "priority": "high", "data": {"disk": "/"}}


def test_notify_refuses_a_bad_notification_before_sending(queues):
    """A caller's mistake raises in the caller's process, naming the field; nothing is sent."""
    with pytest.raises(NotificationError, match=r"priority: must be one of"):
        client.notify("user-1", "alert", "x", priority="urgent")
    assert not any(_payloads(queues, p) for p in ("critical", "high", "normal", "low"))


def test_notify_many_chunks_by_priority(queues):
    """notify_many sends many notifications per message, one queue per priority, ids in order."""
    notes = [{"recipient": "u", "type": "report", "title": f"n{i}"} for i in range(1200)]
    notes.insert(5, {"recipient": "u", "type": "alert", "title": "now", "priority": "critical"})
    ids = client.notify_many(notes)
    assert len(ids) == 1201 and len(set(ids)) == 1201
    assert [len(p) for p in _payloads(queues, "normal")] == [500, 500, 200]
    [critical] = _payloads(queues, "critical")
    assert critical[0]["id"] == ids[5]


def test_notify_many_names_the_bad_item():
    """One bad item stops notify_many before anything is sent, and says which one."""
    notes = [{"recipient": "u", "type": "report", "title": "ok"}, {"recipient": "u", "type": "r"}]
    with pytest.raises(NotificationError, match=r"\[1\] title: is required"):
        client.notify_many(notes)


def test_buffered_producer_publishes_by_size_and_by_time(queues):
    """Full buffers leave at once, a partial one after max_delay; critical is never held."""
    with client.BufferedProducer(max_items=100, max_delay=0.3) as producer:
        for i in range(250):
            producer.notify("u", "report", f"n{i}")
        producer.notify("u", "alert", "now", priority="critical")
        assert [len(p) for p in _payloads(queues, "normal")] == [100, 100]
        assert len(_payloads(queues, "critical")) == 1
        wait_for(lambda: len(_payloads(queues, "normal")) == 3, timeout=5, what="timed flush")
    assert [len(p) for p in _payloads(queues, "normal")] == [100, 100, 50]


def test_buffered_producer_flush_and_close(queues):
    """flush() publishes what is held; close() flushes too and refuses later notifications."""
    producer = client.BufferedProducer(max_items=100, max_delay=60)
    producer.notify("u", "report", "a")
    producer.flush()
    producer.notify("u", "report", "b", priority="low")
    producer.close()
    assert len(_payloads(queues, "normal")) == 1 and len(_payloads(queues, "low")) == 1
    with pytest.raises(RuntimeError):
        producer.notify("u", "report", "c")


_PRODUCER_SCRIPT = textwrap.dedent("""
    import sys, time
    from notifier import client
    producer = client.buffered()
    for i in range(10):
        producer.notify("u", "report", f"n{i}")
    print("buffered", flush=True)
    if sys.argv[1] == "wait":
        time.sleep(60)
""")


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_buffered_producer_flushes_when_the_process_ends(queues, ending):
    """What a process buffered is published at normal exit and on SIGTERM."""
    env = {**os.environ, "NOTIFIER_BUFFER_MAX_DELAY": "60"}
    process = subprocess.Popen(
        [sys.executable, "-c", _PRODUCER_SCRIPT, "wait" if ending == "sigterm" else "exit"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline().strip() == "buffered"
    if ending == "sigterm":
        time.sleep(0.2)
        assert _payloads(queues, "normal") == []
        process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    assert process.returncode == (-signal.SIGTERM if ending == "sigterm" else 0)
    assert [len(p) for p in _payloads(queues, "normal")] == [10]


#: What a producer service never loads: the database layer, the channels' plugins and
#: their libraries, the worker and operations code (the ``server`` extra).
_SERVER_ONLY = (
    "sqlalchemy", "psycopg", "alembic", "apprise", "flower", "tornado", "httpx", "httpcore",
    "requests", "jinja2", "prometheus_client", "celery_batches", "notifier.storage",
    "notifier.pipeline", "notifier.worker", "notifier.ops", "notifier.records",
)

_LIGHT_PRODUCER_SCRIPT = textwrap.dedent("""
    import json, sys
    from notifier.client import ConfirmingProducer, notify, notify_many
    ids = [notify("light-1", "report", "one", priority="high")]
    ids += notify_many([{"recipient": "light-2", "type": "report", "title": "two"}])
    ids.append(ConfirmingProducer().notify("light-3", "report", "three", priority="low"))
    print(json.dumps({"ids": ids, "modules": sorted(sys.modules)}))
""")


def test_importing_the_client_and_sending_loads_no_server_module(queues):
    """A fresh process that imports notifier.client and sends (notify, notify_many, the
    confirming producer) loads neither the database layer, nor the worker, nor a channel
    plugin, nor their libraries; and what it sent is on the broker."""
    from notifier.channels import CHANNEL_NAMES

    result = subprocess.run([sys.executable, "-c", _LIGHT_PRODUCER_SCRIPT], cwd=ROOT,
                            env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout)
    server_only = (*_SERVER_ONLY, *(f"notifier.channels.{name}" for name in CHANNEL_NAMES))
    loaded = [module for module in sent["modules"]
              if any(module == name or module.startswith(f"{name}.") for name in server_only)]
    assert loaded == []
    assert [[item["id"] for item in payload] if isinstance(payload, list) else payload["id"]
            for priority in ("high", "normal", "low")
            for payload in _payloads(queues, priority)] == [sent["ids"][0], [sent["ids"][1]],
                                                            sent["ids"][2]]


def _envelope_without_ids(envelope: Envelope) -> Envelope:
    """A message as the broker holds it, less what differs between any two sends (task
    id, delivery tag, enqueue time, the sending app's reply address, RabbitMQ's count
    of deliveries)."""
    headers, properties = envelope.headers, envelope.properties
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    assert headers.pop("notifier_enqueued_at") == pytest.approx(time.time(), abs=30)
    for key in ("id", "root_id", "x-delivery-count"):
        headers.pop(key, None)
    for key in ("correlation_id", "delivery_tag", "reply_to"):
        properties.pop(key, None)
    return envelope


@pytest.mark.parametrize("priority", ["critical", "low"])
def test_the_producer_app_sends_what_the_workers_app_sent(queues, priority):
    """The client's own Celery app puts on the broker the message the workers' app put
    there before the split (the old ``_publish``): same task name, queue, exchange
    binding, headers, properties and body."""
    from notifier.schemas import ENQUEUED_AT_HEADER
    from notifier.worker.app import app as workers_app

    notification = client.build("same-1", "alert", "Same", priority=priority)
    message = client.to_message(notification)
    client.publish_one(notification)
    workers_app.send_task(client.INGEST_TASK, args=[message], queue=f"notifier.{priority}",
                          headers={ENQUEUED_AT_HEADER: time.time()},
                          argsrepr="[<1 notification>]")
    ours, before = (_envelope_without_ids(envelope)
                    for envelope in queues.peek(f"notifier.{priority}"))
    assert ours == before
    assert ours.headers["task"] == "notifier.ingest"
    if queues.is_rabbitmq:
        return  # RabbitMQ's bindings: tests/test_broker_topology.py
    assert ours.properties["delivery_info"] == {"exchange": "",
                                                "routing_key": f"notifier.{priority}"}
    bindings = queues.client.smembers(f"_kombu.binding.notifier.{priority}")
    assert bindings == {f"notifier.{priority}\x06\x16\x06\x16notifier.{priority}".encode()}


def test_the_producer_app_agrees_with_the_workers_configuration():
    """Every setting the client's app makes is the workers' one, the priority queues are
    declared alike, and the Redis options that decide where a message lands agree; the
    client's app never becomes the process's current app."""
    from celery import current_app
    from kombu.transport.redis import Channel

    from notifier.settings import PRIORITIES
    from notifier.worker.app import app as workers_app

    ours, theirs = client.app.conf, workers_app.conf
    settings = client._producer_settings()
    assert "broker_url" in settings
    for key in settings:
        if key != "task_queues":
            assert ours[key] == theirs[key], key
    declared = {queue.name: queue for queue in theirs.task_queues}
    for queue in ours.task_queues:
        assert queue.name in {f"notifier.{p}" for p in PRIORITIES}
        assert (queue.exchange, queue.routing_key) == (declared[queue.name].exchange,
                                                       declared[queue.name].routing_key)
        assert queue.queue_arguments == declared[queue.name].queue_arguments
    assert len(ours.task_queues) == len(PRIORITIES)
    for option in ("priority_steps", "sep", "global_keyprefix"):
        assert (ours.broker_transport_options.get(option)
                == theirs.broker_transport_options.get(option)), option
        assert option in Channel.from_transport_options
    assert current_app._get_current_object() is not client.app


def _reference_size_bound(value: object) -> int:
    """``client._json_size_bound`` as it was written first (a call per value)."""
    if isinstance(value, str):
        return 2 + (len(value) * 2 if value.isascii() else len(value) * 6)
    if isinstance(value, dict):
        return 2 + sum(_reference_size_bound(k) + _reference_size_bound(v) + 2
                       for k, v in value.items())
    if isinstance(value, list):
        return 2 + sum(_reference_size_bound(v) + 1 for v in value)
    return 24


class _Text(str):
    pass


@pytest.mark.parametrize("value", [
    {}, [], "", "ü", {"id": "x", "recipient": {"id": "u", "email": "a@b.de"}, "n": 1},
    [{"title": "t", "data": {"k": [1, "ü", None, {"d": 2.5}], "ü": "é"}}, "s", 3],
    {"a": _Text("sub"), _Text("k"): ["x", _Text("y")], "deep": [[[{"z": "zz"}]]]},
    {1: "int key", "tuple": ("a", "b"), "none": None, "bool": True},
])
def test_the_message_size_bound_is_the_first_one(value):
    """The inlined bound sizes every value as the first, simpler one did (the chunks a
    list is published in do not change)."""
    assert client._json_size_bound(value) == _reference_size_bound(value)
