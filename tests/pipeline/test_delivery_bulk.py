"""Outcomes recorded in bulk: one statement for many outcomes of every kind, and a
worker killed with outcomes not yet written loses none of its deliveries.

Real parts: ``deliver_batch`` against aiosmtpd, Postgres and Redis; for the kill, a real
worker process, beat's sweeper and the broker.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator

import pytest

from notifier.channels import close_channels
from notifier.pipeline import delivery
from notifier.pipeline.delivery import RECORD_AT_MOST, deliver_batch
from notifier.pipeline.outbox import queue_deliveries
from notifier.settings import get_settings
from notifier.storage.db import raw_cursor, session_scope
from notifier.storage.state import state_redis
from tests.pipeline.test_delivery import make_deliveries, settings_for
from tests.smtp_server import SmtpServer
from tests.workers import WorkerProcess, count_rows, wait_for_count

SENT = "SELECT count(*) FROM deliveries WHERE status = 'sent'"


@pytest.fixture(autouse=True)
def _fresh_channels() -> Iterator[None]:
    """Channel instances keep connections; each test builds its own from its settings."""
    close_channels()
    yield
    close_channels()


def rows(ids: list[str]) -> dict[str, dict[str, object]]:
    with session_scope() as session:
        found = session.connection().exec_driver_sql(
            "SELECT id::text, recipient_id, status, attempts, last_error, sent_at, updated_at"
            " FROM deliveries WHERE id = ANY(%s::uuid[])", (ids,),
        ).all()
    return {row[0]: row._asdict() for row in found}


def test_a_batch_of_mixed_outcomes_is_recorded_by_one_statement(smtp_server, monkeypatch):
    """Sent, retryable, permanent and rate-limited, all waiting for the batch's end:
    every one recorded as it should be, by one statement (one ``now()``)."""
    monkeypatch.setattr(delivery, "RECORD_EVERY_SECONDS", 3600.0)
    # user-0 twice (the second over its limit of 1 an hour), user-1 sent, user-2
    # refused for now (451), user-3 refused for good (550).
    ids = make_deliveries(5, recipients=4, priority="high")
    smtp_server.refuse_recipient("user-2@example.com", code=451)
    smtp_server.refuse_recipient("user-3@example.com", code=550)
    settings = settings_for(smtp_server.url(retry_base="60"), rate_limit_per_hour=1)

    outcome = deliver_batch("email", ids, settings, state_redis())

    assert outcome.as_dict() == {"sent": 2, "retrying": 1, "dead": 1, "rescheduled": 1,
                                "suppressed": 0}
    found = rows(ids)
    by_status = Counter(str(row["status"]) for row in found.values())
    assert by_status == {"sent": 2, "retrying": 2, "dead": 1}
    of = {str(row["recipient_id"]): row for row in found.values() if row["status"] != "sent"}
    sent = [row for row in found.values() if row["status"] == "sent"]
    assert sorted(str(row["recipient_id"]) for row in sent) == ["user-0", "user-1"]
    for row in sent:
        assert row["attempts"] == 1 and row["last_error"] is None and row["sent_at"]
    refused, dead, held = of["user-2"], of["user-3"], of["user-0"]
    assert refused["status"] == "retrying" and refused["attempts"] == 1
    assert "451" in str(refused["last_error"]) and refused["sent_at"] is None
    assert dead["status"] == "dead" and dead["attempts"] == 1 and "550" in str(dead["last_error"])
    assert held["status"] == "retrying" and held["attempts"] == 0
    assert "rate limit" in str(held["last_error"])
    assert len({row["updated_at"] for row in found.values()}) == 1  # one statement
    assert count_rows("SELECT count(*) FROM dead_letters WHERE delivery_id = :id",
                      id=dead["id"]) == 1
    assert len(outcome.latencies) == 2


def test_outcomes_are_written_as_they_come_when_each_takes_longer_than_the_interval(
    smtp_server,
):
    """A slow server: each outcome is written before the next message goes, so a worker
    killed then has only the message in hand in doubt (as before bulk recording)."""
    smtp_server.delay = delivery.RECORD_EVERY_SECONDS * 3
    ids = make_deliveries(4)
    deliver_batch("email", ids, settings_for(smtp_server.url()), state_redis())
    found = rows(ids)
    assert {row["status"] for row in found.values()} == {"sent"}
    assert len({row["updated_at"] for row in found.values()}) == 4


def test_a_worker_killed_with_outcomes_not_yet_written_loses_no_delivery(smtp_server):
    """SIGKILL in the middle of one big batch on a fast server, with outcomes waiting to
    be written: after the lease runs out the sweeper resends what is in doubt, with the
    same Message-ID; every delivery ends sent, and only a bounded few twice."""
    count = 300
    ids = make_deliveries(count)
    with session_scope() as session:
        big = get_settings().model_copy(update={"delivery_batch_size": count})
        [task] = queue_deliveries(raw_cursor(session), ids, big, from_status="queued")
    smtp_server.delay = 0.003  # outcomes come faster than RECORD_EVERY_SECONDS
    worker = _worker(smtp_server)
    try:
        from notifier.worker.tasks import publish

        publish([task])
        smtp_server.wait_for(count // 3, timeout=30)
        worker.kill()
        assert len(smtp_server.message_ids()) < count
        smtp_server.delay = 0.0
        worker = _worker(smtp_server)
        wait_for_count(SENT, count, timeout=90)
    finally:
        worker.stop()
    received = Counter(smtp_server.message_ids())
    assert set(received) == set(ids)
    twice = [delivery_id for delivery_id, times in received.items() if times > 1]
    assert max(received.values()) <= 2
    assert len(twice) <= RECORD_AT_MOST + 1  # what waited to be written, and the one in hand


def _worker(smtp: SmtpServer) -> WorkerProcess:
    return WorkerProcess.start("-B", "--schedule", tempfile.mktemp(prefix="beat-"),
                               env={"NOTIFIER_CHANNELS__EMAIL": smtp.url()}, concurrency=1)

