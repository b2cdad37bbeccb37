"""Retention: every table's old, finished rows are purged in bounded batches; nothing
still on its way, waiting or referred to is ever purged.

Rows are written with the timestamps they would have after ``age`` days; the purge runs
as beat's task does (``purge_expired``), on the test database.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from notifier.pipeline.inbox import mark
from notifier.pipeline.retention import purge_expired
from notifier.settings import ConfigError, Settings, load_settings
from notifier.storage.db import session_scope
from notifier.storage.models import (
    FINISHED_DELIVERY_STATUSES,
    UNFINISHED_DELIVERY_STATUSES,
    DeliveryStatus,
)
from notifier.worker.app import app
from tests.ops.test_cli import run
from tests.workers import count_rows, wait_for

OLD = 40  # days: past every default retention but dead letters' and read inbox's 90
ANCIENT = 100
YOUNG = 1
TABLES = ("notifications", "deliveries", "digests", "aggregation_windows", "inbox_messages",
          "dead_letters", "idempotency_keys")


def settings(**overrides: Any) -> Settings:
    return Settings(**{"retention_batch_pause": 0, **overrides})


def ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def execute(sql: str, **params: Any) -> None:
    with session_scope() as session:
        session.execute(text(sql), params)


def counts() -> dict[str, int]:
    return {table: count_rows(f"SELECT count(*) FROM {table}") for table in TABLES}


def notification(days: float, status: str = "delivered", *, digest_id: Any = None,
                 window_id: Any = None) -> uuid.UUID:
    note_id = uuid.uuid4()
    execute("INSERT INTO recipients (id) VALUES ('u') ON CONFLICT DO NOTHING")
    execute(
        "INSERT INTO notifications (id, recipient_id, type, priority, title, status,"
        " digest_id, window_id, created_at, updated_at) VALUES (:id, 'u', 'report', 'normal',"
        " 't', :status, :digest, :window, :at, :at)",
        id=note_id, status=status, digest=digest_id, window=window_id, at=ago(days),
    )
    return note_id


def delivery(days: float, status: str = "sent", *, notification_id: Any = None,
             digest_id: Any = None, channel: str = "inapp") -> uuid.UUID:
    delivery_id = uuid.uuid4()
    execute(
        "INSERT INTO deliveries (id, notification_id, digest_id, recipient_id, channel,"
        " priority, status, created_at, updated_at) VALUES (:id, :note, :digest, 'u', :channel,"
        " 'normal', :status, :at, :at)",
        id=delivery_id, note=notification_id, digest=digest_id, channel=channel,
        status=status, at=ago(days),
    )
    return delivery_id


def digest(days: float) -> uuid.UUID:
    digest_id = uuid.uuid4()
    execute("INSERT INTO recipients (id) VALUES ('u') ON CONFLICT DO NOTHING")
    execute(
        "INSERT INTO digests (id, recipient_id, type, channel, title, body, item_count,"
        " notification_ids, window_start, window_end, created_at) VALUES (:id, 'u', 'alert',"
        " 'inapp', 't', 'b', 2, '{}', :at, :at, :at)",
        id=digest_id, at=ago(days),
    )
    return digest_id


def window(due_days_ago: float) -> uuid.UUID:
    window_id = uuid.uuid4()
    execute(
        "INSERT INTO aggregation_windows (id, recipient_id, type, mode, opened_at, due_at,"
        " latest_due_at, max_count, closed) VALUES (:id, 'u', 'alert', 'fixed', :at, :at, :at,"
        " 3, true)",
        id=window_id, at=ago(due_days_ago),
    )
    return window_id


def inbox_message(days: float, *, read: bool) -> uuid.UUID:
    message_id = uuid.uuid4()
    execute(
        "INSERT INTO inbox_messages (id, recipient_id, type, priority, title, body, created_at,"
        " read_at) VALUES (:id, 'u', 'report', 'normal', 't', 'b', :at, :read_at)",
        id=message_id, at=ago(days), read_at=ago(days) if read else None,
    )
    return message_id


def dead_letter(days: float, delivery_id: Any = None) -> None:
    execute(
        "INSERT INTO dead_letters (dedup_key, stage, reason, delivery_id, payload, created_at)"
        " VALUES (:key, :stage, 'provider refused', :delivery, '{}', :at)",
        key=f"k-{uuid.uuid4()}", stage="deliver" if delivery_id else "ingest",
        delivery=delivery_id, at=ago(days),
    )


def idempotency_key(expired: bool) -> None:
    execute(
        "INSERT INTO idempotency_keys (key, notification_id, expires_at) VALUES (:key, :id,"
        " now() + CASE WHEN :expired THEN interval '-1 s' ELSE interval '1 h' END)",
        key=f"key-{uuid.uuid4()}", id=uuid.uuid4(), expired=expired,
    )


def finished_rows(days: float, copies: int = 1) -> None:
    """A finished row of every table (``copies`` times), ``days`` old."""
    for _ in range(copies):
        note = notification(days)
        delivery(days, notification_id=note)
        group = digest(days)
        for _ in range(2):
            notification(days, "digested", digest_id=group)
        delivery(days, digest_id=group)
        window(days)
        inbox_message(days, read=True)
        dead_letter(days)
        idempotency_key(expired=days > YOUNG)


# --- what is purged ------------------------------------------------------------------


def test_old_finished_rows_of_every_table_are_purged_in_bounded_batches():
    """Every table's old rows go, over as many batches of ``retention_batch_size`` as it
    takes, with a pause between full batches; young rows stay."""
    finished_rows(ANCIENT, copies=5)
    finished_rows(YOUNG)
    pauses: list[float] = []

    purged = purge_expired(settings(retention_batch_size=2, retention_batch_pause=0.01),
                           sleep=pauses.append)

    # The young window was due a day ago, an hour is enough for windows.
    assert purged == {"deliveries": 10, "notifications": 15, "digests": 5,
                      "aggregation_windows": 6, "inbox_messages": 5, "dead_letters": 5,
                      "idempotency_keys": 5}
    assert counts() == {"notifications": 3, "deliveries": 2, "digests": 1,
                        "aggregation_windows": 0, "inbox_messages": 1, "dead_letters": 1,
                        "idempotency_keys": 1}
    # Batches of 2: 10 deliveries take 5 full batches (and an empty one), and so on;
    # every full batch but one that ends a table is followed by a pause.
    assert len(pauses) == sum(n // 2 for n in purged.values())
    assert set(pauses) == {0.01}


@pytest.mark.parametrize("status", ["dispatched", "digested", "delivered", "suppressed",
                                    "cancelled", "failed"])
def test_an_old_notification_in_any_settled_status_goes_once_it_has_no_delivery(status):
    notification(ANCIENT, status)
    young = notification(YOUNG, status)
    assert purge_expired(settings()) == {"notifications": 1}
    assert count_rows("SELECT count(*) FROM notifications WHERE id = :id", id=young) == 1


@pytest.mark.parametrize("status", FINISHED_DELIVERY_STATUSES)
def test_an_old_finished_delivery_goes_and_then_its_notification(status):
    note = notification(ANCIENT, "delivered")
    delivery(ANCIENT, status, notification_id=note)
    assert purge_expired(settings()) == {"deliveries": 1, "notifications": 1}


def test_a_second_run_purges_nothing_more():
    finished_rows(ANCIENT, copies=2)
    finished_rows(YOUNG)
    assert purge_expired(settings())
    before = counts()
    assert purge_expired(settings()) == {}
    assert counts() == before


def test_a_run_stops_when_its_time_is_used_up_and_the_next_one_goes_on():
    """A long backlog is purged over several runs: each stops after its time."""
    for _ in range(6):
        dead_letter(ANCIENT)
    ticks = iter(range(100))  # a clock read once at the start and once per full batch
    limited = settings(retention_batch_size=2, retention_run_seconds=1.5,
                       visibility_timeout=300)

    first = purge_expired(limited, clock=lambda: float(next(ticks)))

    assert first == {"dead_letters": 4}  # two batches, then its 1.5 "seconds" were up
    assert count_rows("SELECT count(*) FROM dead_letters") == 2
    assert purge_expired(settings(retention_batch_size=2)) == {"dead_letters": 2}


def test_a_run_never_outlasts_half_the_visibility_timeout():
    """Acknowledged late: a run past the visibility timeout would be handed to a second
    worker, so half of it bounds the run whatever retention_run_seconds says."""
    for _ in range(6):
        dead_letter(ANCIENT)
    ticks = iter(range(100))
    limited = settings(retention_batch_size=2, retention_run_seconds=1000,
                       visibility_timeout=4, retry_countdown_max=2)
    assert purge_expired(limited, clock=lambda: float(next(ticks))) == {"dead_letters": 4}


def test_zero_keeps_a_table_forever():
    finished_rows(ANCIENT)
    purged = purge_expired(settings(
        retention_dead_letters_days=0, retention_inbox_read_days=0,
        retention_deliveries_days=0, retention_notifications_days=0, retention_digests_days=0,
    ))
    assert purged == {"aggregation_windows": 1, "idempotency_keys": 1}
    assert count_rows("SELECT count(*) FROM notifications") == 3


def test_read_inbox_messages_go_after_their_own_retention():
    inbox_message(OLD, read=True)  # 40 days: within the default 90
    inbox_message(ANCIENT, read=True)
    assert purge_expired(settings()) == {"inbox_messages": 1}
    assert purge_expired(settings(retention_inbox_read_days=30)) == {"inbox_messages": 1}


def test_unread_inbox_messages_are_kept_unless_a_longer_setting_says_otherwise():
    kept = inbox_message(ANCIENT, read=False)
    assert purge_expired(settings()) == {}
    assert count_rows("SELECT count(*) FROM inbox_messages WHERE id = :id", id=kept) == 1
    purged = purge_expired(settings(retention_inbox_read_days=30,
                                    retention_inbox_unread_days=60))
    assert purged == {"inbox_messages (unread)": 1}


def test_archived_inbox_messages_go_as_read_ones_and_seen_ones_stay_as_unread_ones():
    """Archiving stamps read_at, so an archived message is purged by the read retention,
    counted from when it was read; a message only seen is still unread, and kept."""
    archived_today = inbox_message(ANCIENT, read=False)
    seen = inbox_message(ANCIENT, read=False)
    archived_long_ago = inbox_message(ANCIENT, read=True)
    execute("UPDATE inbox_messages SET archived_at = read_at WHERE id = :id", id=archived_long_ago)
    with session_scope() as session:
        assert mark(session, "u", "archived", [archived_today]) == 1
        assert mark(session, "u", "seen", [seen]) == 1
    assert purge_expired(settings()) == {"inbox_messages": 1}
    assert count_rows("SELECT count(*) FROM inbox_messages WHERE id = ANY(:ids)",
                      ids=[archived_today, seen]) == 2


# --- what is never purged ------------------------------------------------------------

UNFINISHED = [s.value for s in DeliveryStatus if s not in FINISHED_DELIVERY_STATUSES]


def test_every_delivery_status_is_finished_or_unfinished():
    """One source: a status added to DeliveryStatus must be placed in one list."""
    assert set(UNFINISHED) == set(UNFINISHED_DELIVERY_STATUSES)


@pytest.mark.parametrize("status", UNFINISHED)
def test_an_unfinished_delivery_keeps_itself_its_siblings_and_its_notification(status):
    """A delivery that is pending, queued, sending, retrying or scheduled, however old:
    it, the finished delivery of the same notification on another channel, and the
    notification all stay."""
    note = notification(ANCIENT, "dispatched")
    delivery(ANCIENT, status, notification_id=note, channel="email")
    delivery(ANCIENT, "sent", notification_id=note, channel="inapp")
    assert purge_expired(settings()) == {}
    assert counts()["deliveries"] == 2 and counts()["notifications"] == 1


@pytest.mark.parametrize("status", UNFINISHED)
def test_a_digest_with_an_unfinished_delivery_is_kept_with_its_members(status):
    group = digest(ANCIENT)
    members = [notification(ANCIENT, "digested", digest_id=group) for _ in range(2)]
    delivery(ANCIENT, status, digest_id=group, channel="email")
    delivery(ANCIENT, "sent", digest_id=group, channel="inapp")
    assert purge_expired(settings()) == {}
    assert count_rows("SELECT count(*) FROM notifications WHERE id = ANY(:ids)", ids=members) == 2
    assert counts()["digests"] == 1 and counts()["deliveries"] == 2


def test_a_notification_waiting_in_its_window_is_kept_with_the_window():
    """Pending (it waits for its digest), in a window long overdue (beat was down)."""
    group = window(ANCIENT)
    notification(ANCIENT, "pending", window_id=group)
    assert purge_expired(settings()) == {}
    assert counts()["notifications"] == 1 and counts()["aggregation_windows"] == 1


def test_an_empty_window_goes_an_hour_past_its_due_time():
    window(0.5 / 24)  # due half an hour ago: the flush may still take it
    window(2 / 24)
    assert purge_expired(settings()) == {"aggregation_windows": 1}


def test_a_digest_is_kept_while_a_member_notification_is():
    """Its members were digested recently (notifications keep them 30 days)."""
    group = digest(ANCIENT)
    notification(YOUNG, "digested", digest_id=group)
    assert purge_expired(settings()) == {}
    assert counts()["digests"] == 1


def test_a_row_the_pipeline_holds_locked_is_skipped_not_waited_for():
    """SKIP LOCKED: a row locked by another transaction stays; the run does not block."""
    note = notification(ANCIENT, "delivered")
    other = notification(ANCIENT, "delivered")
    with session_scope() as holder:
        holder.execute(text("SELECT 1 FROM notifications WHERE id = :id FOR UPDATE"),
                       {"id": note})
        assert purge_expired(settings()) == {"notifications": 1}
    assert count_rows("SELECT count(*) FROM notifications WHERE id = :id", id=other) == 0
    assert purge_expired(settings()) == {"notifications": 1}


def test_a_table_locked_by_someone_else_waits_for_the_next_run(caplog):
    """The lock timeout: a purge never queues behind another lock holder for long; that
    table is left for the next run and the others are purged meanwhile."""
    dead_letter(ANCIENT)
    inbox_message(ANCIENT, read=True)
    with session_scope() as holder:
        holder.execute(text("LOCK TABLE dead_letters IN EXCLUSIVE MODE"))
        purged = purge_expired(settings(retention_lock_timeout=0.2))
    assert purged == {"inbox_messages": 1}
    assert "retention: dead_letters skipped until the next run" in caplog.text
    assert "lock timeout" in caplog.text
    assert purge_expired(settings()) == {"dead_letters": 1}


def test_a_dead_letter_outlives_its_delivery_and_replay_says_why_it_skips_it():
    """Deliveries go after 30 days, their dead letters after 90: a replay in between
    has nothing to send and says so."""
    note = notification(ANCIENT, "failed")
    gone = delivery(ANCIENT, "dead", notification_id=note)
    dead_letter(OLD, gone)
    assert purge_expired(settings()) == {"deliveries": 1, "notifications": 1}
    assert counts()["dead_letters"] == 1

    result = run("dead-letters", "replay", "--yes")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "replayed 0 dead letters; 1 skipped (their delivery was deleted by retention,"
        " NOTIFIER_RETENTION_DELIVERIES_DAYS)")
    assert count_rows("SELECT count(*) FROM deliveries") == 0


# --- settings and the task -----------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("NOTIFIER_RETENTION_NOTIFICATIONS_DAYS", "10",
     "NOTIFIER_RETENTION_NOTIFICATIONS_DAYS: must be 0 (keep) or at least"
     " NOTIFIER_RETENTION_DELIVERIES_DAYS (30), got 10"),
    ("NOTIFIER_RETENTION_INBOX_UNREAD_DAYS", "30",
     "NOTIFIER_RETENTION_INBOX_UNREAD_DAYS: must be 0 (keep) or at least"
     " NOTIFIER_RETENTION_INBOX_READ_DAYS (90), got 30"),
    ("NOTIFIER_RETENTION_DEAD_LETTERS_DAYS", "-1",
     "NOTIFIER_RETENTION_DEAD_LETTERS_DAYS: Input should be greater than or equal to 0"),
])
def test_a_retention_setting_that_cannot_hold_is_refused_in_one_line(
    monkeypatch, variable, value, message
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == message


def test_the_purge_task_runs_on_a_worker(worker):
    """The task beat sends, run by a real worker, purges every table."""
    from notifier.worker.tasks import purge_expired as task

    finished_rows(ANCIENT, copies=2)
    task.apply_async(queue="notifier.low")
    wait_for(lambda: not any(counts().values()), timeout=30, what="every table purged")


def test_beat_schedules_only_registered_tasks():
    """Every entry of the beat schedule names a task the worker has."""
    app.loader.import_default_modules()
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks
    assert app.conf.beat_schedule["purge-expired-rows"]["task"] == "notifier.purge_expired"
