"""Delivery batches against a real SMTP server, Postgres and Redis, run in this process.

Each test writes critical notifications through the real ingest path (which creates
their delivery rows), then runs ``deliver_batch`` as the ``notifier.deliver`` task
would, and checks what the server received and what Postgres recorded.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from notifier.channels import close_channels
from notifier.pipeline.delivery import deliver_batch
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.outbox import queue_deliveries, sweep_due_deliveries
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
from tests.workers import count_rows


@pytest.fixture(autouse=True)
def _fresh_channels():
    """Channel instances keep connections; each test builds its own from its settings."""
    close_channels()
    yield
    close_channels()


def settings_for(smtp_url: str, **overrides: Any):
    return get_settings().model_copy(update={
        "channels": {**get_settings().channels, "email": smtp_url}, **overrides,
    })


def make_deliveries(count: int, *, recipients: int | None = None, channel: str = "email",
                    priority: str = "critical") -> list[str]:
    """``count`` notifications through ingest; returns their delivery ids, queued."""
    batch = uuid.uuid4().hex[:8]
    messages = [
        IngestMessage(f"message-{batch}-{i}", {
            "recipient": {"id": f"user-{i % (recipients or count)}",
                          "email": f"user-{i % (recipients or count)}@example.com"},
            "type": "alert", "priority": priority, "title": f"Alert {i}", "body": f"body {i}",
            "channels": [channel],
        }, None)
        for i in range(count)
    ]
    with session_scope() as session:
        result = ingest_batch(session, messages)
        cursor = session.connection().connection.driver_connection.cursor()
        delivery_ids = result.delivery_ids or _deliveries_for(cursor, result.stored, channel)
        queue_deliveries(cursor, delivery_ids, get_settings())
    return [str(i) for i in delivery_ids]


def _deliveries_for(cursor: Any, notification_ids: list[uuid.UUID], channel: str) -> list:
    """Delivery rows for notifications that would otherwise wait for their digest window."""
    cursor.execute(
        "INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority)"
        " SELECT gen_random_uuid(), id, recipient_id, %s, priority FROM notifications"
        " WHERE id = ANY(%s) ORDER BY id RETURNING id",
        (channel, notification_ids),
    )
    return [row[0] for row in cursor.fetchall()]


def statuses() -> dict[str, int]:
    with session_scope() as session:
        rows = session.connection().exec_driver_sql(
            "SELECT status, count(*) FROM deliveries GROUP BY status"
        ).all()
    return dict(rows)


def delivery_row(delivery_id: str) -> dict[str, Any]:
    with session_scope() as session:
        row = session.connection().exec_driver_sql(
            "SELECT status, attempts, next_attempt_at, last_error FROM deliveries WHERE id = %s",
            (delivery_id,),
        ).one()
    return row._asdict()


def run(ids: list[str], settings) -> Any:
    return deliver_batch("email", ids, settings, state_redis())


def test_a_batch_goes_over_one_connection_and_is_recorded(smtp_server):
    ids = make_deliveries(5)
    outcome = run(ids, settings_for(smtp_server.url()))
    assert outcome.as_dict() == {"sent": 5, "retrying": 0, "dead": 0, "rescheduled": 0,
                                "suppressed": 0}
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert smtp_server.connections == 1
    assert statuses() == {"sent": 5}
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'delivered'") == 5


def test_a_delivery_already_sent_is_never_sent_again(smtp_server):
    ids = make_deliveries(3)
    settings = settings_for(smtp_server.url())
    run(ids, settings)
    outcome = run(ids, settings)  # the same task again: a redelivery or a republish
    assert outcome.sent == 0
    assert len(smtp_server.message_ids()) == 3


def test_only_the_failed_items_of_a_batch_are_retried(smtp_server):
    ids = make_deliveries(3)
    smtp_server.refuse_recipient("user-1@example.com", code=451)
    settings = settings_for(smtp_server.url(retry_base="0.2"))
    outcome = run(ids, settings)
    assert (outcome.sent, outcome.retrying) == (2, 1)
    assert statuses() == {"sent": 2, "queued": 1}  # due in under a second: a countdown task
    [retry] = outcome.tasks
    assert retry.delivery_ids == [ids[1]] and 0 < retry.countdown <= 2  # 0.1-0.2 s, whole s

    smtp_server.reset()
    time.sleep(retry.countdown)
    again = run(ids, settings)
    assert again.sent == 1
    assert smtp_server.message_ids() == [ids[1]]
    assert delivery_row(ids[1])["attempts"] == 2


def test_a_server_that_answers_4xx_twice_then_accepts_gets_it_on_the_third_attempt(
    smtp_server,
):
    [delivery_id] = make_deliveries(1)
    smtp_server.fail_next(2, code=451, text="try again later")
    settings = settings_for(smtp_server.url())
    waiting = {"retrying", "queued"}  # a wait in Postgres, or a countdown task if short
    for expected in (waiting, waiting, {"sent"}):
        _make_due(delivery_id)
        run([delivery_id], settings)
        assert delivery_row(delivery_id)["status"] in expected
    assert delivery_row(delivery_id)["attempts"] == 3
    assert smtp_server.message_ids() == [delivery_id]


def test_backoff_grows_exponentially_with_jitter_and_gives_up(smtp_server):
    [delivery_id] = make_deliveries(1)
    smtp_server.fail_always(code=451, text="greylisted")
    settings = settings_for(smtp_server.url(
        retry_base="10", retry_factor="3", retry_cap="100", retry_max_attempts="4",
    ))
    waits = []
    for attempt in range(1, 5):
        _make_due(delivery_id)
        outcome = run([delivery_id], settings)
        row = delivery_row(delivery_id)
        assert row["attempts"] == attempt
        if attempt < 4:
            assert outcome.retrying == 1 and row["status"] == "retrying"
            waits.append((row["next_attempt_at"] - datetime.now(UTC)).total_seconds())
    ceilings = [10, 30, 90]
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 - 1 <= wait <= ceiling  # equal jitter: half to all of it
    assert row["status"] == "dead"
    [dead] = _dead_letters()
    assert dead["stage"] == "deliver" and dead["attempts"] == 4 and dead["channel"] == "email"
    assert "gave up after 4 attempts" in dead["reason"] and "greylisted" in dead["reason"]
    assert dead["payload"]["title"] == "Alert 0"


def test_a_permanent_failure_is_dead_at_once_with_the_server_reason(smtp_server):
    ids = make_deliveries(2)
    smtp_server.refuse_recipient("user-0@example.com", code=550)
    outcome = run(ids, settings_for(smtp_server.url()))
    assert (outcome.sent, outcome.dead) == (1, 1)
    [dead] = _dead_letters()
    assert dead["delivery_id"] == ids[0] and dead["attempts"] == 1
    assert "550" in dead["reason"] and dead["error_class"] == "PermanentError"
    assert count_rows("SELECT count(*) FROM notifications WHERE status = 'failed'") == 1


def test_a_recipient_without_an_address_is_dead_without_contacting_anyone(smtp_server):
    with session_scope() as session:
        result = ingest_batch(session, [IngestMessage("m", {
            "recipient": "nobody", "type": "alert", "priority": "critical", "title": "t",
            "channels": ["email"],
        }, None)])
    outcome = run([str(i) for i in result.delivery_ids], settings_for(smtp_server.url()))
    assert outcome.dead == 1 and smtp_server.connections == 0
    assert "has no email address" in _dead_letters()[0]["reason"]


def test_the_circuit_opens_after_failures_and_reschedules_without_attempts(smtp_server):
    settings = settings_for(smtp_server.url(), breaker_failure_threshold=3)
    smtp_server.stop()
    first = make_deliveries(3)
    outcome = run(first, settings)
    assert outcome.retrying == 3
    assert state_redis().hget("notifier.breaker.{email}", "state") == b"open"

    later = make_deliveries(2)
    outcome = run(later, settings)
    assert outcome.rescheduled == 2 and outcome.sent == 0
    assert all(delivery_row(i)["attempts"] == 0 for i in later)
    assert all("circuit open" in delivery_row(i)["last_error"] for i in later)


def test_a_half_open_circuit_probes_once_then_closes_and_sends_the_rest(smtp_server):
    settings = settings_for(smtp_server.url(), breaker_failure_threshold=1,
                            breaker_open_seconds=0.5)
    from notifier.pipeline.delivery import circuit_breaker

    breaker = circuit_breaker(state_redis(), "email", settings)
    breaker.record(failures=1, successes=0, probing=False)
    assert breaker.state() == "open"
    time.sleep(0.6)
    outcome = run(make_deliveries(4), settings)
    assert outcome.sent == 4
    assert breaker.state() == "closed"


def test_a_failed_probe_opens_the_circuit_again(smtp_server):
    settings = settings_for(smtp_server.url(), breaker_failure_threshold=1,
                            breaker_open_seconds=0.5)
    from notifier.pipeline.delivery import circuit_breaker

    breaker = circuit_breaker(state_redis(), "email", settings)
    breaker.record(failures=1, successes=0, probing=False)
    time.sleep(0.6)
    smtp_server.fail_always(code=421, text="service not available")
    outcome = run(make_deliveries(4), settings)
    assert (outcome.retrying, outcome.rescheduled) == (1, 3)  # one probe, the rest held
    assert breaker.state() == "open"


def test_a_recipient_over_its_rate_limit_is_rescheduled_to_the_window_reset(smtp_server):
    settings = settings_for(smtp_server.url(), rate_limit_per_minute=2)
    ids = make_deliveries(3, recipients=1, priority="high")
    before = time.time()
    outcome = run(ids, settings)
    assert (outcome.sent, outcome.rescheduled) == (2, 1)
    [held] = [i for i in ids if delivery_row(i)["status"] != "sent"]
    row = delivery_row(held)
    assert row["attempts"] == 0 and "rate limit" in row["last_error"]
    reset = (int(before // 60) + 1) * 60
    assert abs(row["next_attempt_at"].timestamp() - reset) < 2


def test_critical_deliveries_are_never_held_by_a_recipient_limit(smtp_server):
    settings = settings_for(smtp_server.url(), rate_limit_per_minute=1)
    outcome = run(make_deliveries(3, recipients=1), settings)
    assert outcome.sent == 3


def test_the_global_limit_holds_everything_over_it(smtp_server):
    settings = settings_for(smtp_server.url(), rate_limit_global_per_minute=2)
    outcome = run(make_deliveries(4), settings)
    assert (outcome.sent, outcome.rescheduled) == (2, 2)


def test_a_channel_without_configuration_holds_with_the_variable_to_set():
    """Our configuration, not the delivery's fault: held (no attempt), never dead."""
    ids = make_deliveries(1, channel="sms")
    outcome = deliver_batch("sms", ids, get_settings(), state_redis())
    assert (outcome.dead, outcome.rescheduled) == (0, 1)
    row = delivery_row(ids[0])
    assert row["attempts"] == 0 and "NOTIFIER_CHANNELS__SMS" in row["last_error"]
    assert _dead_letters() == []


def test_the_sweeper_queues_lost_tasks_due_retries_and_abandoned_claims(smtp_server):
    ids = make_deliveries(3)
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "UPDATE deliveries SET status = %s, next_attempt_at = now() - interval '1 hour',"
            " queued_at = now() - interval '1 hour', updated_at = now() - interval '1 hour'"
            " WHERE id = %s",
            [("queued", ids[0]), ("retrying", ids[1]), ("sending", ids[2])],
        )
    with session_scope() as session:
        cursor = session.connection().connection.driver_connection.cursor()
        tasks = sweep_due_deliveries(cursor, get_settings())
    assert sorted(i for task in tasks for i in task.delivery_ids) == sorted(ids)
    assert {task.queue for task in tasks} == {"notifier.deliver.critical"}
    run(ids, settings_for(smtp_server.url()))
    assert sorted(smtp_server.message_ids()) == sorted(ids)


def test_the_sweeper_leaves_fresh_work_alone(smtp_server):
    make_deliveries(3)
    with session_scope() as session:
        cursor = session.connection().connection.driver_connection.cursor()
        assert sweep_due_deliveries(cursor, get_settings()) == []


def _make_due(delivery_id: str) -> None:
    with session_scope() as session:
        session.connection().exec_driver_sql(
            "UPDATE deliveries SET next_attempt_at = now() WHERE id = %s", (delivery_id,)
        )


def _dead_letters() -> list[dict[str, Any]]:
    with session_scope() as session:
        rows = session.connection().exec_driver_sql(
            "SELECT stage, reason, error_class, channel, delivery_id::text, attempts, payload"
            " FROM dead_letters ORDER BY id"
        ).all()
    return [row._asdict() for row in rows]

