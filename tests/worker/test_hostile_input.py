"""Hostile producers against a real worker: every failure stays with its own message.

Each test sends what a careless or hostile producer could (a type that breaks a log
line, a header of the wrong type, a task id too long for a column, a message too big,
a message that kills the pool process) next to good notifications, and checks that the
good ones are stored once, the bad ones dead-lettered once, and nothing stays
unacknowledged in the broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from celery import Celery
from sqlalchemy import text

from notifier.storage.db import session_scope
from notifier.worker.queues import INGEST_QUEUES
from tests.brokers import connect, foreign_producer
from tests.conftest import BROKER, BROKER_URL
from tests.workers import WorkerProcess, count_rows, wait_for

QUEUES = INGEST_QUEUES


def _note(**fields: object) -> dict[str, object]:
    return {"recipient": "user-1", "type": "task_deadline", "title": "Due soon",
            "id": str(uuid.uuid4())} | fields


@pytest.fixture(scope="module")
def producer() -> Iterator[Celery]:
    app = foreign_producer("hostile", BROKER_URL)
    yield app
    app.close()


def send(producer: Celery, args: list[Any], *, task_id: str | None = None,
         headers: dict[str, Any] | None = None, queue: str = "notifier.normal") -> str:
    task_id = task_id or str(uuid.uuid4())
    producer.send_task("notifier.ingest", args=args, task_id=task_id, headers=headers or {},
                       queue=queue)
    return task_id


def broker_is_drained() -> bool:
    """No message waits in a queue and none is held unacknowledged."""
    broker = connect(BROKER_URL)
    try:
        return broker.drained(QUEUES)
    finally:
        broker.close()


def stored(note_id: object) -> int:
    return count_rows("SELECT count(*) FROM notifications WHERE id = :id", id=str(note_id))


def dead_letters() -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(
            "SELECT dedup_key, reason, error_class, payload, payload_bytes, payload_sha256,"
            " payload_truncated FROM dead_letters ORDER BY id"
        )))


def wait_until_settled(good: list[dict[str, object]], dead: int, timeout: float = 30) -> None:
    """Every good notification stored, ``dead`` dead letters, the broker drained."""
    wait_for(lambda: all(stored(n["id"]) == 1 for n in good)
             and count_rows("SELECT count(*) FROM dead_letters") >= dead
             and broker_is_drained(), timeout, "good notifications, dead letters, an empty broker")
    assert count_rows("SELECT count(*) FROM dead_letters") == dead


# --- finding 1: one message's failure is its own --------------------------------------


def test_type_that_breaks_url_masking_costs_only_its_item(worker, producer):
    """``type: "x://["`` (its rejection's log line once raised inside the transaction, so
    the batch looped and the good notification beside it was never stored)."""
    good = _note()
    task_id = send(producer, [[good, _note(type="x://[")]])
    wait_until_settled([good], dead=1)
    (row,) = dead_letters()
    assert row.dedup_key == f"ingest:{task_id}:1"
    assert row.reason.startswith("type: must start with a lowercase letter")


def test_enqueued_at_header_of_any_value_is_ignored(worker, producer):
    """A header ``notifier_enqueued_at`` of 1e20 (OverflowError), NaN, a string or a
    list is not a time: the notifications are stored without it. (RabbitMQ closes the
    connection of a publisher whose header holds a NaN, INTERNAL_ERROR: Erlang has no
    NaN, so there that message never reaches a worker.)"""
    stamps: list[object] = [1e20, -1e20, "yesterday", [1, 2]]
    if BROKER == "redis":
        stamps.append(float("nan"))
    good = [_note() for _ in stamps]
    for note, stamp in zip(good, stamps, strict=True):
        send(producer, [note], headers={"notifier_enqueued_at": stamp})
    wait_until_settled(good, dead=0)
    assert count_rows("SELECT count(*) FROM notifications WHERE enqueued_at IS NOT NULL") == 0


@pytest.mark.skipif(BROKER == "rabbitmq", reason="AMQP carries the task id in correlation_id, a"
                    " short string: RabbitMQ takes no message with a 300-character task id")
def test_task_id_longer_than_a_column_still_dead_letters(worker, producer):
    """A 300-character task id beside a bad item: the dead letter's key is a hash of
    it (the 255-character column once refused even the dead letter)."""
    good = _note()
    task_id = send(producer, [[good, _note(priority="urgent")]], task_id="t" * 300)
    wait_until_settled([good], dead=1)
    (row,) = dead_letters()
    digest = hashlib.sha256(task_id.encode()).hexdigest()
    assert row.dedup_key == f"ingest:sha256:{digest}:1"
    assert row.reason.startswith("priority: must be one of")


def test_message_postgres_refuses_for_any_reason_costs_itself_alone(worker, producer):
    """A message whose rows fail in Postgres with an error that is not about content
    (here a trigger raising a custom SQLSTATE) is dead-lettered with the class; the
    messages batched with it commit."""
    with session_scope() as session:
        session.execute(text("""
            CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.title = 'poison' THEN
                    RAISE EXCEPTION 'refused by a trigger' USING ERRCODE = 'P0001';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_refuse BEFORE INSERT ON notifications
                FOR EACH ROW EXECUTE FUNCTION test_refuse();
        """))
    try:
        good = [_note() for _ in range(6)]
        send(producer, [good[:3]])
        send(producer, [[_note(title="poison")]])
        send(producer, [good[3:]])
        wait_until_settled(good, dead=1)
        (row,) = dead_letters()
        assert row.error_class == "RaiseException"
        assert "refused by a trigger" in row.reason
    finally:
        with session_scope() as session:
            session.execute(text("DROP TRIGGER test_refuse ON notifications;"
                                 " DROP FUNCTION test_refuse()"))


# --- finding 2: nothing unbounded -------------------------------------------------------


def test_oversized_message_is_dead_lettered_undecoded(producer):
    """A message over ``NOTIFIER_MAX_MESSAGE_BYTES`` is refused before it is decoded:
    its dead letter holds a prefix, the full size and the SHA-256."""
    worker = WorkerProcess.start(env={"NOTIFIER_MAX_MESSAGE_BYTES": "100000"})
    try:
        good = _note()
        big = [_note(body="b" * 60_000), _note(body="b" * 60_000)]
        task_id = send(producer, [big])
        send(producer, [good])
        wait_until_settled([good], dead=1)
    finally:
        worker.stop()
    (row,) = dead_letters()
    assert row.dedup_key == f"ingest:{task_id}:message"
    assert row.error_class == "MessageTooLarge"
    assert "more than the limit of 100000" in row.reason
    assert row.payload_truncated and row.payload_bytes > 100_000
    assert len(json.dumps(row.payload)) < 70_000


def test_too_many_notifications_in_one_message(worker, producer):
    """A message of more notifications than ``max_message_notifications`` (1,000) is
    refused whole, naming the count and the limit; the next message lands."""
    good = _note()
    send(producer, [[_note() for _ in range(1001)]])
    send(producer, [good])
    wait_until_settled([good], dead=1)
    (row,) = dead_letters()
    assert row.reason == "message: holds 1001 notifications, more than the limit of 1000"


def test_huge_address_is_refused_naming_field_limit_and_size(worker, producer):
    """A 1 MB webhook URL is refused; the reason names the field, limit and size, and does
    not repeat the value."""
    good = _note()
    url = "https://x.example/" + "a" * 1_000_000
    send(producer, [[good, _note(recipient={"id": "mallory", "addresses": {"webhook": url}})]])
    wait_until_settled([good], dead=1)
    (row,) = dead_letters()
    assert row.reason == (f"recipient.addresses.webhook: is {len(url)} characters, more than"
                          " the limit of 2048")


def test_rejection_reason_never_repeats_a_huge_value(worker, producer):
    """An invalid priority of 100,000 characters is quoted cut to a short prefix."""
    good = _note()
    send(producer, [[good, _note(priority="p" * 100_000)]])
    wait_until_settled([good], dead=1)
    (row,) = dead_letters()
    assert row.reason.startswith("priority: must be one of")
    assert len(row.reason) < 200


# --- finding 2: a message that keeps coming back ------------------------------------------


def _kill_pool_process_in_trigger_sleep(worker: WorkerProcess, stop: threading.Event) -> int:
    """Kill (SIGKILL) every pool process whose Postgres backend sleeps in the trigger,
    and end that backend; returns how many were killed."""
    killed = 0
    parent = psutil.Process(worker.process.pid)
    while not stop.is_set():
        with session_scope() as session:
            sleeping = list(session.execute(text(
                "SELECT pid, client_port FROM pg_stat_activity"
                " WHERE wait_event = 'PgSleep' AND application_name = 'notifier'"
            )))
        for backend, port in sleeping:
            for child in parent.children(recursive=True):
                if any(c.laddr and c.laddr.port == port for c in child.net_connections("tcp")):
                    os.kill(child.pid, signal.SIGKILL)
                    killed += 1
            with session_scope() as session:
                session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        stop.wait(0.05)
    return killed


def test_message_that_kills_its_pool_process_is_dead_lettered_after_n_tries(producer):
    """A message whose batch kills the pool process every time comes back at most
    ``NOTIFIER_MESSAGE_MAX_FAILURES`` times, then is dead-lettered with the failure's class; the
    good messages batched with it the first time are stored."""
    with session_scope() as session:
        session.execute(text("""
            CREATE FUNCTION test_hang() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.title = 'kills its worker' THEN PERFORM pg_sleep(30); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_hang BEFORE INSERT ON notifications
                FOR EACH ROW EXECUTE FUNCTION test_hang();
        """))
    good = [_note() for _ in range(4)]
    send(producer, [good[:2]])
    poison_id = send(producer, [[_note(title="kills its worker")]])
    send(producer, [good[2:]])
    worker = WorkerProcess.start(env={"NOTIFIER_MESSAGE_MAX_FAILURES": "3",
                                      "NOTIFIER_INGEST_FLUSH_INTERVAL": "0.5"})
    stop = threading.Event()
    killer = threading.Thread(target=_kill_pool_process_in_trigger_sleep, args=(worker, stop))
    killer.start()
    try:
        wait_until_settled(good, dead=1, timeout=60)
    finally:
        stop.set()
        killer.join()
        worker.stop()
        with session_scope() as session:
            session.execute(text("DROP TRIGGER test_hang ON notifications;"
                                 " DROP FUNCTION test_hang()"))
    (row,) = dead_letters()
    assert row.dedup_key == f"ingest:{poison_id}:message"
    assert row.error_class == "WorkerLostError"
    # At least 3: under load Redis may also restore a copy whose visibility timeout
    # (4 s in the tests) passed while it waited for a pool process, and both copies fail.
    came_back = re.match(r"message: came back (\d+) times after failing \(limit 3\); last"
                         r" failure: the worker process failed: WorkerLostError", row.reason)
    assert came_back and int(came_back.group(1)) >= 3, row.reason
    assert row.payload == [{**row.payload[0], "title": "kills its worker"}]


def test_postgres_away_longer_than_the_limit_dead_letters_nothing(producer):
    """Failures while Postgres is unusable (here: its table renamed away) are not the
    message's: it comes back more than ``NOTIFIER_MESSAGE_MAX_FAILURES`` times and is stored
    once the table is back, with no dead letter."""
    worker = WorkerProcess.start(env={"NOTIFIER_MESSAGE_MAX_FAILURES": "2"})
    with session_scope() as session:
        session.execute(text("ALTER TABLE notifications RENAME TO notifications_away"))
    try:
        good = _note()
        send(producer, [good])
        wait_for(lambda: worker.log().count("returning 1 messages to the queue") >= 4,
                 timeout=30, what="four returns to the queue")
    finally:
        with session_scope() as session:
            session.execute(text("ALTER TABLE notifications_away RENAME TO notifications"))
    try:
        wait_until_settled([good], dead=0)
    finally:
        worker.stop()


def test_unreadable_messages_are_dead_lettered_not_dropped(worker, producer):
    """A compressed body (a zlib bomb would be decompressed before any size check) and
    a message whose ``eta`` header is not a time cannot be read: each is dead-lettered
    with the reason; the message sent between them lands."""
    good = _note()
    zipped = producer.send_task("notifier.ingest", args=[[_note()]], compression="zlib",
                                queue="notifier.normal").id
    send(producer, [good])
    bad_eta = send(producer, [[_note()]], headers={"eta": "not a time"})
    wait_until_settled([good], dead=2)
    reasons = {row.dedup_key: row.reason for row in dead_letters()}
    assert reasons[f"ingest:{zipped}:message"] == (
        "message: compressed bodies are not accepted (compression: 'application/x-gzip')")
    assert reasons[f"ingest:{bad_eta}:message"].startswith(
        "message: could not be read: InvalidTaskError: invalid ETA value 'not a time'")


def test_client_splits_a_batch_that_would_exceed_the_message_limit():
    """notify_many with big notifications publishes messages under
    ``NOTIFIER_MAX_MESSAGE_BYTES`` (ingest would dead-letter a bigger one whole)."""
    from notifier import client
    from notifier.settings import get_settings

    limit = get_settings().max_message_bytes
    notes = [_note(body="é" * 60_000) for _ in range(60)]  # ~7 MB of JSON, escaped more
    client.notify_many(notes)
    broker = connect(BROKER_URL)
    try:
        sizes = [len(envelope.body) for envelope in broker.peek("notifier.normal")]
    finally:
        broker.empty_queues()  # no worker here: leave nothing for the next test
        broker.close()
    assert len(sizes) > 1 and max(sizes) < limit, sizes
