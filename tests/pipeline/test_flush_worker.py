"""Flushes that run at the same time (separate Postgres sessions), flushes racing ingest,
and beat's flush in a real worker.

Window timing is driven by explicit clocks; the only waiting is for another session to
reach a lock (seen in ``pg_stat_activity``) or for a real worker to get work done.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from notifier.pipeline.flush import FlushResult, flush_due_windows
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from tests.brokers import foreign_producer
from tests.conftest import BROKER_URL
from tests.pipeline.helpers import (
    MINUTE,
    T0,
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
from tests.workers import WorkerProcess, wait_for

DUE = T0 + 5 * MINUTE  # alert windows opened at T0 are due then


def _groups(count: int, size: int = 2) -> list[list[dict]]:
    """``count`` alert groups (one per recipient) of ``size`` items, ingested at T0."""
    groups = [[note("alert", f"user-{g:03d}") for _ in range(size)] for g in range(count)]
    for start in range(0, count, 50):
        ingest([n for group in groups[start:start + 50] for n in group], now=T0)
    return groups


def _every_member_in_exactly_one_digest(groups: list[list[dict]]) -> None:
    members = [m for d in digests() for m in d.notification_ids]
    assert len(members) == len(set(members)) == sum(len(g) for g in groups)
    assert len(digests()) == len(groups)
    by_recipient = {d.recipient_id: d for d in digests()}
    assert len(by_recipient) == len(groups)  # no group digested twice
    for group in groups:
        assert by_recipient[group[0]["recipient"]].notification_ids == ids(group)
    assert query("SELECT count(*) FROM notifications WHERE status <> 'digested'")[0][0] == 0
    assert query("SELECT count(*) FROM deliveries WHERE digest_id IS NOT NULL")[0][0] == len(
        groups)
    assert windows() == []


def _waiting_for_a_lock(kind: str | None = None) -> bool:
    """Whether another session of this database waits for a lock (of ``kind``)."""
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
           " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
    if kind:
        sql += " AND wait_event = :kind"
    return query(sql, kind=kind)[0][0] > 0


def test_two_flushes_at_once_never_take_the_same_window():
    """Two threads, two sessions, released together by a barrier, each flushing chunks of
    ten windows and holding each chunk's locks a moment: SKIP LOCKED shares the work."""
    groups = _groups(200)
    barrier = threading.Barrier(2)

    def flusher() -> list[FlushResult]:
        results = []
        barrier.wait()
        while True:
            with session_scope() as session:
                result = flush_due_windows(raw_cursor(session), BUILTIN_RULES, get_settings(),
                                           DUE, limit=10)
                time.sleep(0.01)  # the other flush runs while these windows are locked
            if not result.windows:
                return results
            results.append(result)

    with ThreadPoolExecutor(2) as pool:
        first, second = (f.result(timeout=120) for f in [pool.submit(flusher) for _ in "ab"])
    assert first and second, "both flushes took windows"
    assert sum(r.windows for r in first + second) == 200
    assert sum(r.digests for r in first + second) == 200
    assert sum(r.notifications for r in first + second) == 400
    _every_member_in_exactly_one_digest(groups)


def test_a_flush_holding_its_transaction_open_does_not_block_another():
    """One flush claims ten windows and stays uncommitted; a second one, meanwhile, takes
    the other twenty at once instead of waiting, and none of the first's."""
    groups = _groups(30)
    with ThreadPoolExecutor(1) as pool, session_scope() as session:
        held = flush_due_windows(raw_cursor(session), BUILTIN_RULES, get_settings(), DUE,
                                 limit=10)
        other = pool.submit(flush, DUE).result(timeout=30)  # would time out if blocked
        assert (held.windows, other.windows) == (10, 20)
        assert len(digests()) == 20  # the held flush's digests are not committed yet
    assert flush(DUE).windows == 0
    assert held.digests + other.digests == 30
    _every_member_in_exactly_one_digest(groups)


def test_an_item_arriving_while_its_window_is_flushed_goes_to_the_next_window():
    """Ingest (with a clock a little behind the flusher's) waits for the flush that holds
    the group's window, then opens a new one: the item is neither lost nor digested."""
    [group] = _groups(1)
    late = note("alert", group[0]["recipient"])
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            assert flush_due_windows(raw_cursor(session), BUILTIN_RULES, get_settings(),
                                     DUE).windows == 1
            arriving = pool.submit(ingest, [late], now=DUE - MINUTE)
            wait_for(_waiting_for_a_lock, timeout=10, what="ingest waiting for the window")
            assert not arriving.done()
        assert len(arriving.result(timeout=30).stored) == 1
    [digest] = digests()
    assert digest.notification_ids == ids(group)
    assert status(late) == "pending"
    [window] = windows()
    assert (window.item_count, window.due_at) == (1, DUE + 4 * MINUTE)


def test_two_ingests_of_one_group_at_once_share_one_window():
    """The open-window unique index serialises batches: one window, not two (the second
    waits for the first's transaction, then adds to its window)."""
    first, second = note("alert", "pair"), note("alert", "pair")
    with session_scope() as session:  # an existing recipient: its upsert takes no lock
        raw_cursor(session).execute("INSERT INTO recipients (id) VALUES ('pair')")
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            message = IngestMessage(str(uuid.uuid4()), [first])
            ingest_batch(session, [message], rules=BUILTIN_RULES, now=T0)
            arriving = pool.submit(ingest, [second], now=T0 + MINUTE)
            wait_for(lambda: _waiting_for_a_lock("transactionid"), timeout=10,
                     what="the second ingest waiting for the group's lock")
        arriving.result(timeout=30)
    [window] = windows()
    assert (window.item_count, window.opened_at, window.due_at) == (2, T0, DUE)
    assert flush(DUE).digests == 1
    assert digests()[0].notification_ids == ids([first, second])


def test_beat_flushes_a_full_group_at_once_not_at_the_end_of_its_window(tmp_path):
    """A real worker with beat (flush every second): three alerts (the maximum) become a
    digest that is delivered within seconds, while the alert window is five minutes and
    the reminder's thirty; the partial groups keep waiting."""
    worker = WorkerProcess.start("-B", "--schedule", str(tmp_path / "beat-schedule"))
    try:
        recipient = {"id": "beat-user", "name": "Beat"}
        full = [note("alert", recipient) for _ in range(3)]
        waiting = [note("alert", "other-user"), note("reminder", recipient)]
        producer = foreign_producer("producer", BROKER_URL)
        producer.send_task("notifier.ingest", args=[full + waiting], queue="notifier.normal")

        def digest_sent() -> bool:
            return query("SELECT count(*) FROM deliveries WHERE digest_id IS NOT NULL"
                         " AND status = 'sent'")[0][0] == 1

        wait_for(digest_sent, timeout=60, what="the full group's digest to be sent")
    finally:
        worker.stop()

    [digest] = digests()
    assert (digest.title, digest.notification_ids) == ("3 alerts", ids(full))
    assert {status(n) for n in full} == {"digested"}
    assert [status(n) for n in waiting] == ["pending", "pending"]
    [inbox] = query("SELECT * FROM inbox_messages")
    assert (inbox.recipient_id, inbox.digest_id, inbox.title) == ("beat-user", digest.id,
                                                                  "3 alerts")
    # Flushed long before its window would have closed (generous bound: not a speed test).
    [(last_stored,)] = query("SELECT max(created_at) FROM notifications WHERE id = ANY(:ids)",
                             ids=ids(full))
    assert digest.created_at - last_stored < timedelta(minutes=1)
    # The partial groups' windows are still open, each for its own rule's length.
    now = datetime.now(UTC)
    left = {w.type: w for w in windows()}
    assert set(left) == {"alert", "reminder"}
    assert left["alert"].due_at - left["alert"].opened_at == timedelta(minutes=5)
    assert left["reminder"].due_at - left["reminder"].opened_at == timedelta(minutes=30)
    assert all(w.due_at > now for w in left.values())
