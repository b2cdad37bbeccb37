"""Cancelling notifications by id and by idempotency key, on real Postgres: a cancelled
item never reaches a digest or a channel, and what has gone out cannot be cancelled."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import text

from notifier.pipeline.cancel import CancelOutcome, cancel_by, cancel_notification
from notifier.pipeline.delivery import claim_deliveries, deliver_batch
from notifier.pipeline.flush import flush_due_windows
from notifier.pipeline.outbox import sweep_due_deliveries
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.schemas import NotificationError
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
from tests.pipeline.helpers import (
    MINUTE,
    T0,
    deliveries_of,
    digests,
    flush,
    ids,
    ingest,
    note,
    query,
    raw_cursor,
    status,
    windows,
)
from tests.workers import wait_for

DUE = T0 + 30 * MINUTE  # task_deadline: 30-minute windows of up to 10


def _deliver(delivery_ids: list) -> int:
    return deliver_batch("inapp", [str(i) for i in delivery_ids], get_settings(),
                         state_redis()).sent


def _blocked_on_a_lock() -> bool:
    return query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )[0][0] > 0


def test_cancel_by_id_takes_it_out_of_its_digest():
    notes = [note("task_deadline") for _ in range(3)]
    ingest(notes, now=T0)
    outcome = cancel_by(notes[1]["id"], None)
    assert outcome == CancelOutcome(notes[1]["id"], True, "cancelled")
    [row] = query("SELECT status, status_reason, window_id FROM notifications WHERE id = :id",
                  id=notes[1]["id"])
    assert tuple(row) == ("cancelled", "cancelled on request", None)

    result = flush(DUE)
    assert (result.digests, result.notifications) == (1, 2)
    [digest] = digests()
    assert digest.title == "2 task deadlines approaching"
    assert digest.notification_ids == ids([notes[0], notes[2]])
    assert notes[1]["id"] not in {item["id"] for item in digest.items}
    assert notes[1]["title"] not in digest.body
    assert status(notes[1]) == "cancelled" and deliveries_of(notes[1]["id"]) == []
    # Cancelling again (or a digested member) is refused, saying why.
    assert cancel_by(notes[1]["id"], None) == CancelOutcome(notes[1]["id"], False, "cancelled")
    assert cancel_by(notes[0]["id"], None) == CancelOutcome(notes[0]["id"], False, "digested")


def test_cancel_by_idempotency_key():
    keyed = note("task_deadline", idempotency_key="weekly-report-42")
    other = note("task_deadline")
    ingest([keyed, other], now=T0)
    outcome = cancel_by(None, "weekly-report-42")
    assert outcome == CancelOutcome(keyed["id"], True, "cancelled")
    assert status(keyed) == "cancelled" and status(other) == "pending"
    # Alone in its window now: it goes as itself, no digest of one.
    result = flush(DUE)
    assert (result.windows, result.digests, result.notifications) == (1, 0, 1)
    assert status(other) == "dispatched" and deliveries_of(keyed["id"]) == []


def test_a_window_whose_members_were_all_cancelled_makes_no_digest():
    notes = [note("task_deadline") for _ in range(2)]
    ingest(notes, now=T0)
    for n in notes:
        assert cancel_by(n["id"], None).cancelled
    result = flush(DUE)
    assert (result.windows, result.empty, result.digests) == (1, 1, 0)
    assert digests() == [] and query("SELECT count(*) FROM deliveries")[0][0] == 0
    assert windows() == []


def test_a_held_delivery_is_cancelled_and_never_published():
    """Dispatched but held (send_at in an hour): its scheduled delivery is cancelled."""
    later = note("alert", send_at=(T0 + timedelta(hours=1)).isoformat())
    ingest([later], now=T0)
    [delivery] = deliveries_of(later["id"])
    assert delivery.status == "scheduled" and status(later) == "dispatched"
    assert cancel_by(later["id"], None).cancelled
    [delivery] = deliveries_of(later["id"])
    assert delivery.status == "cancelled"
    with session_scope() as session:  # the database's clock passes the send_at
        session.execute(text("UPDATE deliveries SET next_attempt_at = now() - interval '1 s'"))
        swept = sweep_due_deliveries(raw_cursor(session), get_settings())
    assert swept == []
    assert _deliver([delivery.id]) == 0 and query("SELECT count(*) FROM inbox_messages")[0][0] == 0


def test_a_lone_member_dispatched_by_the_flush_can_still_be_cancelled():
    alone = note("task_deadline")
    ingest([alone], now=T0)
    flush(DUE)
    [delivery] = deliveries_of(alone["id"])
    assert delivery.status == "queued"
    assert cancel_by(alone["id"], None).cancelled
    assert _deliver([delivery.id]) == 0  # the deliver task finds nothing to send
    assert deliveries_of(alone["id"])[0].status == "cancelled"
    assert query("SELECT count(*) FROM inbox_messages")[0][0] == 0


def test_a_sent_notification_cannot_be_cancelled():
    sent = note("alert", priority="critical")
    result = ingest([sent], now=T0)
    assert _deliver(result.delivery_ids) == 1
    assert status(sent) == "delivered"
    assert cancel_by(sent["id"], None) == CancelOutcome(sent["id"], False, "delivered")
    assert deliveries_of(sent["id"])[0].status == "sent"


def test_a_notification_being_sent_cannot_be_cancelled():
    """A delivery worker has claimed it (status sending, the notification still
    dispatched): refused, and its other, unsent delivery is left alone too."""
    sending = note("alert", priority="critical", channels=["inapp", "webhook"])
    result = ingest([sending], now=T0)
    with session_scope() as session:
        inapp = [d.id for d in deliveries_of(sending["id"]) if d.channel == "inapp"]
        claimed = claim_deliveries(raw_cursor(session), "inapp", inapp, get_settings(), 1)
        assert len(claimed) == 1
    assert status(sending) == "dispatched"
    assert cancel_by(sending["id"], None) == CancelOutcome(sending["id"], False, "sending")
    assert {d.channel: d.status for d in deliveries_of(sending["id"])} == {
        "inapp": "sending", "webhook": "pending"}
    assert len(result.delivery_ids) == 2


def test_cancel_waits_for_a_delivery_claim_in_progress_and_then_refuses():
    """A claim not yet committed holds the delivery row: cancel waits for it, sees the
    delivery sending, and refuses (it must not report a notification that is being sent
    as cancelled)."""
    racing = note("alert", priority="critical")
    result = ingest([racing], now=T0)
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as claiming:
            claimed = claim_deliveries(raw_cursor(claiming), "inapp", result.delivery_ids,
                                       get_settings(), claim_key=1)
            assert len(claimed) == 1
            cancelling = pool.submit(cancel_by, racing["id"], None)
            wait_for(_blocked_on_a_lock, timeout=10, what="cancel waiting for the claim")
        outcome = cancelling.result(timeout=30)
    assert outcome == CancelOutcome(racing["id"], False, "sending")
    assert status(racing) == "dispatched"
    assert deliveries_of(racing["id"])[0].status == "sending"


def test_a_flush_waits_for_a_cancel_in_progress_and_leaves_the_item_out():
    notes = [note("task_deadline") for _ in range(3)]
    ingest(notes, now=T0)
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            assert cancel_notification(session, notes[0]["id"]).cancelled
            flushing = pool.submit(flush, DUE)
            wait_for(_blocked_on_a_lock, timeout=10, what="the flush waiting for the cancel")
        result = flushing.result(timeout=30)
    assert (result.digests, result.notifications) == (1, 2)
    assert digests()[0].notification_ids == ids(notes[1:])
    assert status(notes[0]) == "cancelled"


def test_a_cancel_during_a_flush_waits_and_is_refused():
    notes = [note("task_deadline") for _ in range(2)]
    ingest(notes, now=T0)
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            flushed = flush_due_windows(raw_cursor(session), BUILTIN_RULES, get_settings(), DUE)
            assert flushed.digests == 1
            cancelling = pool.submit(cancel_by, notes[0]["id"], None)
            wait_for(_blocked_on_a_lock, timeout=10, what="the cancel waiting for the flush")
        outcome = cancelling.result(timeout=30)
    assert outcome == CancelOutcome(notes[0]["id"], False, "digested")
    assert digests()[0].notification_ids == ids(notes)


def test_unknown_and_bad_input_are_reported():
    missing = str(uuid.uuid4())
    assert cancel_by(missing, None) == CancelOutcome(missing, False, "not found")
    assert cancel_by("nope", None) == CancelOutcome(None, False, "not a notification id: 'nope'")
    assert cancel_by(None, "never-used") == CancelOutcome(
        None, False, "no notification with idempotency key 'never-used'")
    for both_or_neither in [(missing, "key"), (None, None)]:
        with pytest.raises(NotificationError, match="give a notification id or an idempotency"):
            cancel_by(*both_or_neither)
