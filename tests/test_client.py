"""The producer API, checked by reading what it put on the real broker (no worker runs)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import redis

from notifier import client
from notifier.schemas import NotificationError
from tests.conftest import BROKER_URL
from tests.workers import ROOT, wait_for


@pytest.fixture
def queues() -> redis.Redis:
    return redis.Redis.from_url(BROKER_URL)


def _payloads(queues: redis.Redis, priority: str) -> list[object]:
    """The first argument of every message waiting in a priority queue, oldest first."""
    raw = queues.lrange(f"notifier.{priority}", 0, -1)
    payloads = []
    for message in reversed(raw):  # kombu LPUSHes and consumers BRPOP
        envelope = json.loads(message)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert envelope["headers"]["task"] == "notifier.ingest"
        assert "@" not in envelope["headers"]["argsrepr"]  # no contents in Flower or logs
        payloads.append(args[0])
    return payloads


def test_notify_returns_the_id_at_once_and_routes_by_priority(queues):
    """notify() returns a UUIDv7 without waiting for a worker and uses the priority's queue."""
    note_id = client.notify("user-1", "alert", "Disk full", priority="high", data={"disk": "/"})
    assert uuid.UUID(note_id).version == 7
    [payload] = _payloads(queues, "high")
    envelope = json.loads(queues.lindex("notifier.high", 0))
    assert envelope["headers"]["argsrepr"] == "[<1 notification>]"
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
