"""A claim lives as long as its claimant: a dead worker's deliveries are resumed at once,
a slow one's never (``notifier.pipeline.delivery.Claim``).

Real workers, a real SMTP server that holds its answer to DATA (so a worker is caught
with a message sent and not yet acknowledged), Redis and RabbitMQ. The recovery tests
give the workers a ``NOTIFIER_SENDING_TIMEOUT`` of ten minutes: a delivery resumed
within the tests' time can only have been freed by its claimant's death, never by the
old timeout. Each prints the seconds from the kill to the last delivery sent
(docs/operating.md quotes them; run with ``-s`` to see them).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from notifier.client import build
from notifier.pipeline.delivery import BatchOutcome, Claim, _Recorder, claim_deliveries
from notifier.pipeline.outbox import sweep_due_deliveries
from notifier.schemas import to_message
from notifier.settings import get_settings
from notifier.storage.db import raw_cursor, session_scope
from tests.brokers import foreign_producer
from tests.conftest import BROKER, BROKER_URL, DATABASE_URL
from tests.pipeline.test_delivery import make_deliveries
from tests.pipeline.test_delivery_recovery import SENT, assert_each_sent_once
from tests.smtp_server import SmtpServer
from tests.workers import WorkerProcess, count_rows, wait_for, wait_for_count

pytestmark = pytest.mark.slow

COUNT = 20
#: Far beyond the tests' time: only a freed claim can explain a delivery resumed.
NO_TIMEOUT = {"NOTIFIER_SENDING_TIMEOUT": "600"}
#: Claims held right now, as the test sees them: rows ``sending`` whose lock is taken.
HELD_CLAIMS = """
    SELECT count(*) FROM deliveries
    WHERE status = 'sending' AND NOT pg_try_advisory_xact_lock(claim_key)
"""


def _worker(smtp: SmtpServer, *args: str, beat: bool = False, concurrency: int = 1,
            env: dict[str, str] | None = None) -> WorkerProcess:
    """A worker sending to ``smtp``, waiting up to a minute for each answer (a slow
    server, not a failing one); with ``beat``, it also runs the sweep."""
    extra = [*args, "-B", "--schedule", f"/tmp/beat-claims-{time.time_ns()}"] if beat else args
    return WorkerProcess.start(
        *extra, concurrency=concurrency,
        env={"NOTIFIER_CHANNELS__EMAIL": smtp.url(timeout=60), **NO_TIMEOUT, **(env or {})},
    )


def _criticals(count: int) -> list[dict[str, Any]]:
    return [
        to_message(build({"id": f"user-{i}", "email": f"user-{i}@example.com"}, "alert",
                         f"Alert {i}", priority="critical", channels=["email"]))
        for i in range(count)
    ]


def _publish_criticals(broker_url: str, count: int) -> None:
    """Critical notifications in one message, as ``notify_many`` sends them: their
    deliveries are claimed a batch at a time, so a kill leaves many claimed."""
    producer = foreign_producer("producer", broker_url)
    producer.send_task("notifier.ingest", args=[_criticals(count)], queue="notifier.critical")
    producer.close()


def _sending() -> list[tuple[str, int]]:
    with session_scope() as session:
        rows = session.connection().exec_driver_sql(
            "SELECT id::text, claim_key FROM deliveries WHERE status = 'sending' ORDER BY id")
        return [(row[0], row[1]) for row in rows]


def test_a_killed_workers_claims_are_resumed_by_another_and_sent_once(smtp_server):
    """SIGKILL while the server holds DATA: the message is neither acknowledged nor
    recorded, the worker's rows are ``sending``; a worker already running (its beat's
    sweep every ``NOTIFIER_SWEEP_INTERVAL``, 5 s by default, as here) sends them.
    On the run's broker: ``make test`` runs it on Redis and on RabbitMQ."""
    broker = {"NOTIFIER_BROKER_URL": BROKER_URL}
    smtp_server.hold()
    doomed = _worker(smtp_server, env=broker)
    survivor = None
    try:
        _publish_criticals(BROKER_URL, COUNT)
        in_hand = smtp_server.wait_for_held(1, timeout=30)
        wait_for(lambda: count_rows(HELD_CLAIMS) > 0, 10, "the claim to be held")
        claimed = _sending()
        assert in_hand[0] in {delivery_id for delivery_id, _ in claimed}
        survivor = _worker(smtp_server, beat=True, concurrency=2,
                           env={**broker, "NOTIFIER_SWEEP_INTERVAL": "5"})
        doomed.kill()
        killed_at = time.monotonic()
        smtp_server.wait_until_not_held(in_hand, timeout=10)  # the server dropped it
        smtp_server.release()
        wait_for_count(SENT, COUNT, timeout=60)
        recovered = time.monotonic() - killed_at
    finally:
        smtp_server.release()
        doomed.stop()
        if survivor is not None:
            survivor.stop()
    print(f"\nclaims of a SIGKILLed worker ({BROKER}): {len(claimed)}"
          f" resumed, all {COUNT} sent {recovered:.1f}s after the kill")
    assert_each_sent_once(smtp_server, COUNT)


def test_a_slow_workers_claim_is_never_taken(smtp_server):
    """A worker waiting on the server far past ``NOTIFIER_SENDING_TIMEOUT`` (6 s in the
    tests) keeps its claim: neither the sweep nor a claim of the same deliveries (their
    task handed out again) takes it, sweep after sweep; everything is sent once when
    the server answers."""
    smtp_server.hold()
    slow = _worker(smtp_server, env={"NOTIFIER_SENDING_TIMEOUT": "6"})
    try:
        _publish_criticals(get_settings().broker_url, 5)
        in_hand = smtp_server.wait_for_held(1, timeout=30)
        wait_for(lambda: count_rows(HELD_CLAIMS) > 0, 10, "the claim to be held")
        claimed = _sending()
        held_since = time.monotonic()
        settings = get_settings().model_copy(update={"sending_timeout": 6.0})
        sweeps = 0
        while sweeps < 10 or time.monotonic() - held_since < 2 * settings.sending_timeout:
            with session_scope() as session:
                cursor = raw_cursor(session)
                # (Tasks still waiting in the busy worker's prefetch look lost after
                # NOTIFIER_QUEUED_TIMEOUT and are swept: they are not the claim.)
                swept = {i for task in sweep_due_deliveries(cursor, settings)
                         for i in task.delivery_ids}
                retaken = claim_deliveries(cursor, "email", [i for i, _ in claimed], settings,
                                           claim_key=1)
            assert not swept & {i for i, _ in claimed}, "the sweep took the slow claim"
            assert retaken == [], "a second claim took the slow claim"
            sweeps += 1
            time.sleep(settings.sweep_interval)  # beat's pace
        assert _sending() == claimed
        assert smtp_server.wait_for_held(1, timeout=1) == in_hand
        assert smtp_server.message_ids() == []
        smtp_server.release()
        wait_for_count(SENT, 5, timeout=60)
    finally:
        smtp_server.release()
        slow.stop()
    assert_each_sent_once(smtp_server, 5)


def test_the_claims_connection_terminated_frees_the_claim_and_stops_the_batch(smtp_server):
    """``pg_terminate_backend`` on the claim's connection: the rows are free at once,
    and the worker, alive, sends nothing more of that batch (the message in hand is
    answered and recorded); the rest goes out afterwards, each once."""
    smtp_server.hold()
    worker = _worker(smtp_server)
    try:
        _publish_criticals(get_settings().broker_url, 5)
        smtp_server.wait_for_held(1, timeout=30)
        wait_for(lambda: count_rows(HELD_CLAIMS) > 0, 10, "the claim to be held")
        with psycopg.connect(DATABASE_URL.replace("+psycopg", ""), autocommit=True) as admin:
            holders = admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock'"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
            assert len(holders) == 1
            admin.execute("SELECT pg_terminate_backend(%s)", holders[0])
        wait_for(lambda: count_rows(HELD_CLAIMS) == 0, 10, "the claim to be freed")
        assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'sending'") > 0
        smtp_server.release()
        worker.wait_for_log("the claim's Postgres connection was lost", timeout=30)
        wait_for_count(SENT, 5, timeout=60)
    finally:
        smtp_server.release()
        worker.stop()
    assert_each_sent_once(smtp_server, 5)


def test_a_claim_holds_its_rows_while_its_connection_lives_and_not_after():
    """In one process, the parts alone: rows claimed under a ``Claim`` are skipped by the
    sweep and by a second claim, their outcome is written under it, and the rest are
    swept at once when its connection closes without a word (as a killed worker's)."""
    ids = make_deliveries(3)
    settings = get_settings().model_copy(update={"sending_timeout": 600.0})
    claim = Claim().__enter__()
    claim.hold()
    with session_scope() as session:
        claimed = claim_deliveries(raw_cursor(session), "email", ids, settings, claim.key)
    assert len(claimed) == 3
    with session_scope() as session:
        assert sweep_due_deliveries(raw_cursor(session), settings) == []
        assert claim_deliveries(raw_cursor(session), "email", ids, settings, 1) == []
    recorder = _Recorder("email", settings, BatchOutcome(), claim)
    with recorder:
        recorder.sent(claimed[0])
    assert not claim.lost()
    claim.driver.pgconn.finish()  # the socket closes; no COMMIT, no ROLLBACK
    wait_for(lambda: bool(_swept(settings)), 10, "the sweep to take the rows")
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'sent'") == 1
    assert count_rows("SELECT count(*) FROM deliveries WHERE status = 'queued'") == 2
    claim.connection.invalidate()


def _swept(settings: Any) -> list[str]:
    with session_scope() as session:
        return [i for task in sweep_due_deliveries(raw_cursor(session), settings)
                for i in task.delivery_ids]
