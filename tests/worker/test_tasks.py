"""The ingest task through a real broker and real worker processes."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import event, text

from notifier import client
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.storage.db import driver_connection, get_engine, pooled_connection, session_scope
from notifier.worker import tasks
from tests.brokers import foreign_producer
from tests.conftest import BROKER_URL
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_rows


def _note(**fields: object) -> dict[str, object]:
    return {"recipient": "user-1", "type": "task_deadline", "title": "Due soon"} | fields


def test_foreign_producer_sends_by_task_name(worker):
    """A service with a plain Celery app sends notifier.ingest by name, one or a list."""
    foreign = foreign_producer("billing", BROKER_URL)
    single = _note(id=str(uuid.uuid4()), priority="critical")
    foreign.send_task("notifier.ingest", args=[single], queue="notifier.critical")
    foreign.send_task("notifier.ingest", args=[[_note(), _note()]], queue="notifier.normal")
    wait_for_rows(3)
    assert count_rows("SELECT count(*) FROM notifications WHERE id = :id", id=single["id"]) == 1
    assert count_rows("SELECT count(*) FROM deliveries") == 1


def test_single_notify_calls_are_written_in_batches(worker):
    """Many one-notification messages are gathered into few transactions, not one each."""
    ids = [client.notify("user-1", "reminder", f"r{i}") for i in range(300)]
    wait_for_rows(len(ids))
    transactions = count_rows("SELECT count(DISTINCT xmin::text) FROM notifications")
    assert transactions < 60, f"{transactions} transactions for 300 messages"


def test_bad_input_through_the_worker(worker):
    """Bad notifications from a foreign producer are dead-lettered; good ones still land."""
    foreign = foreign_producer("shop", BROKER_URL)
    foreign.send_task("notifier.ingest", args=[[_note(), _note(title=""), "not an object"]],
                      queue="notifier.high")
    foreign.send_task("notifier.ingest", args=[_note(), "extra"], queue="notifier.high")
    wait_for(lambda: count_rows("SELECT count(*) FROM dead_letters") == 3, what="dead letters")
    assert count_rows() == 1
    with session_scope() as session:
        reasons = set(session.scalars(text("SELECT reason FROM dead_letters")))
    assert "title: is required" not in reasons  # present but empty is a different problem
    assert any(r.startswith("title: String should have at least 1 character") for r in reasons)
    assert "notification: expected a JSON object, got str" in reasons
    assert any(r.startswith("message: notifier.ingest takes one argument") for r in reasons)


def test_row_postgres_refuses_is_isolated(worker):
    """If Postgres refuses one message's rows, that message is dead-lettered, the rest land."""
    with session_scope() as session:
        session.execute(text(
            "ALTER TABLE notifications ADD CONSTRAINT test_no_poison CHECK (title <> 'poison')"
        ))
    try:
        client.notify_many([_note(title="fine")] * 5)
        client.notify_many([_note(title="poison")])
        client.notify_many([_note(title="also fine")] * 5)
        wait_for(lambda: count_rows("SELECT count(*) FROM dead_letters") == 1, what="dead letter")
        wait_for_rows(10)
        with session_scope() as session:
            reason = session.scalar(text("SELECT reason FROM dead_letters"))
        assert "database refused the message" in reason and "test_no_poison" in reason
    finally:
        with session_scope() as session:
            session.execute(text("ALTER TABLE notifications DROP CONSTRAINT test_no_poison"))


def test_batch_that_cannot_commit_returns_to_the_queue(worker):
    """While the table is unusable nothing is acknowledged; the message lands afterwards."""
    with session_scope() as session:
        session.execute(text("ALTER TABLE notifications RENAME TO notifications_away"))
    try:
        note_id = client.notify("user-1", "reminder", "survives")
        worker.wait_for_log("returning 1 messages to the queue", timeout=20)
    finally:
        with session_scope() as session:
            session.execute(text("ALTER TABLE notifications_away RENAME TO notifications"))
    wait_for_rows(1)
    assert count_rows("SELECT count(*) FROM notifications WHERE id = :id", id=note_id) == 1
    assert count_rows("SELECT count(*) FROM dead_letters") == 0


@pytest.mark.slow
def test_critical_is_committed_before_a_normal_backlog():
    """A critical notification sent behind 5,000 normal ones is stored before most of them."""
    for _ in range(5000):
        client.notify("user-1", "digest_item", "bulk")
    critical_id = client.notify("user-1", "alert", "server down", priority="critical")
    worker = WorkerProcess.start()
    try:
        wait_for_rows(5001, timeout=120)
    finally:
        worker.stop()
    ahead = count_rows(
        "SELECT count(*) FROM notifications WHERE priority = 'normal' AND created_at <"
        " (SELECT created_at FROM notifications WHERE id = :id)", id=critical_id,
    )
    assert ahead < 1000, f"{ahead} of 5,000 normal notifications were stored first"


# --- the queue step after an ingest commit (in this process, real Postgres) -------------


def _critical_messages(count: int) -> list[IngestMessage]:
    return [IngestMessage(str(uuid.uuid4()), _note(priority="critical", channels=["inapp"]))
            for _ in range(count)]


def test_critical_deliveries_are_queued_on_the_batch_connection_after_its_commit():
    """A committed batch's due deliveries are marked queued, grouped into the tasks to
    publish, on the connection that committed them: the pool hands out one connection
    per batch (its check, pre-ping, is a round trip), and takes it back in transaction
    mode, so the next session is a transaction again, not a statement at a time."""
    engine = get_engine()
    checkouts: list[object] = []
    listener = lambda driver, *_: checkouts.append(driver)  # noqa: E731
    event.listen(engine, "checkout", listener)
    try:
        result = tasks.store_messages(_critical_messages(3))
    finally:
        event.remove(engine, "checkout", listener)
    assert len(checkouts) == 1
    assert len(result.delivery_ids) == 3
    assert [(t.channel, sorted(t.delivery_ids)) for t in result.delivery_tasks] == [
        ("inapp", sorted(str(i) for i in result.delivery_ids))]
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'queued'") == 3
    assert not checkouts[0].autocommit  # the batch's connection, back in the pool
    with session_scope() as session:
        assert not driver_connection(session).autocommit
        session.execute(text("UPDATE deliveries SET status = 'sending'"))
        session.rollback()  # a transaction again: undone
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'queued'") == 3


def test_a_queue_step_that_fails_leaves_the_committed_rows_to_the_sweeper():
    """Postgres lost between the commit and the queue step (the backend killed, as a
    network cut would): nothing raises, no task is returned, and the rows stay
    ``pending``, which the sweeper publishes; the pool replaces the dead connection."""
    with pooled_connection() as connection:
        with session_scope(connection=connection) as session:
            result = ingest_batch(session, _critical_messages(2))
            backend = driver_connection(session).info.backend_pid
        with session_scope() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        assert tasks.queue_committed_deliveries(connection, result.delivery_ids) == []
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'pending'") == 2
    assert len(tasks.store_messages(_critical_messages(1)).delivery_tasks) == 1
