"""Retention: expired idempotency keys are forgotten, live ones kept."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from notifier.celery_app import app
from notifier.db import session_scope
from notifier.retention import purge_expired_idempotency_keys
from tests.workers import count_rows, wait_for


def _keys(expired: int, live: int) -> None:
    with session_scope() as session:
        for index in range(expired + live):
            session.execute(text(
                "INSERT INTO idempotency_keys (key, notification_id, expires_at) VALUES"
                " (:key, :id, now() + CASE WHEN :expired THEN interval '-1 s'"
                " ELSE interval '1 h' END)"
            ), {"key": f"k{index}", "id": uuid.uuid4(), "expired": index < expired})


def test_purge_deletes_only_expired_keys_in_bounded_batches():
    """Each call deletes at most a batch of expired keys and never a live one."""
    _keys(expired=25, live=5)
    with session_scope() as session:
        assert purge_expired_idempotency_keys(session, batch_size=10) == 10
    with session_scope() as session:
        assert purge_expired_idempotency_keys(session, batch_size=100) == 15
    assert count_rows("SELECT count(*) FROM idempotency_keys") == 5


def test_the_purge_task_runs_on_a_worker(worker):
    """The task beat sends, run by a real worker, deletes every expired key."""
    from notifier.tasks import purge_expired_keys

    _keys(expired=30, live=2)
    purge_expired_keys.apply_async(queue="notifier.low")
    wait_for(lambda: count_rows("SELECT count(*) FROM idempotency_keys") == 2,
             timeout=30, what="expired keys purged")


def test_beat_schedules_only_registered_tasks():
    """Every entry of the beat schedule names a task the worker has."""
    app.loader.import_default_modules()
    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks
