"""The races set-based ingest relies on, run on real concurrent Postgres sessions:

* two batches opening the same group's window at once meet on the unique index of the
  open window: one open window, one digest per period, every item counted once;
* a worker's cached preferences (``notifier.pipeline.routing.recipient_states``) are
  never used after a change to them has committed, whoever made it.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy import text

from notifier.pipeline.ingest import IngestMessage, IngestResult, ingest_batch
from notifier.pipeline.routing import recipient_states
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.storage.db import session_scope
from tests.pipeline.helpers import (
    MINUTE,
    T0,
    digests,
    flush,
    ids,
    ingest,
    note,
    prefs,
    query,
    raw_cursor,
    status,
    windows,
)
from tests.workers import wait_for

DUE = T0 + 5 * MINUTE  # alert windows (5 minutes, at most 3 items) opened at T0


def _waiting_for_a_transaction() -> bool:
    """Whether another session waits for a transaction to end (a row or index entry)."""
    return query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event = 'transactionid' AND pid <> pg_backend_pid()"
    )[0][0] > 0


def _create(*recipients: str) -> None:
    with session_scope() as session:
        session.execute(text("INSERT INTO recipients (id) SELECT unnest(CAST(:ids AS text[]))"),
                        {"ids": list(recipients)})


def test_two_batches_opening_one_groups_window_at_once_share_it():
    """Neither finds an open window; the second waits on the first's new row and then
    fills that window to its maximum and opens the next one with its last item."""
    _create("pair")
    first = [note("alert", "pair") for _ in range(2)]
    second = [note("alert", "pair") for _ in range(2)]
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            ingest_batch(session, [IngestMessage(str(uuid.uuid4()), first)],
                         rules=BUILTIN_RULES, now=T0)
            arriving = pool.submit(ingest, second, now=T0 + MINUTE)
            wait_for(_waiting_for_a_transaction, timeout=10,
                     what="the second batch waiting for the first's window")
            assert not arriving.done()
        assert len(arriving.result(timeout=30).stored) == 2

    full, following = windows()
    assert (full.item_count, full.closed, full.due_at) == (3, True, T0 + MINUTE)
    assert (following.item_count, following.closed) == (1, False)
    assert query("SELECT count(*) FROM aggregation_windows WHERE NOT closed")[0][0] == 1
    result = flush(T0 + MINUTE)
    assert (result.windows, result.digests) == (1, 1)
    assert digests()[0].notification_ids == ids(first + second[:1])
    assert status(second[1]) == "pending"


def test_many_groups_opened_by_two_batches_at_once_in_opposite_orders():
    """Two batches released together, over the same fifty groups listed in opposite
    orders: no deadlock, and each group ends with one window holding both items."""
    recipients = [f"racer-{i:02d}" for i in range(50)]
    _create(*recipients)
    batches = [[note("alert", r) for r in recipients],
               [note("alert", r) for r in reversed(recipients)]]
    start = threading.Barrier(2)

    def run(notes: list[dict]) -> int:
        start.wait(timeout=10)
        return len(ingest(notes, now=T0).stored)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, batches, timeout=60)) == [50, 50]

    found = windows()
    assert sorted(w.recipient_id for w in found) == recipients
    assert {(w.item_count, w.closed) for w in found} == {(2, False)}
    result = flush(DUE)
    assert (result.windows, result.digests, result.notifications) == (50, 50, 100)
    assert sorted(i for d in digests() for i in d.notification_ids) == sorted(
        ids(batches[0] + batches[1]))


def _the_same_message_twice_at_once(
    message: IngestMessage, later: datetime, held: str,
) -> tuple[IngestResult, tuple[list[uuid.UUID], int]]:
    """Ingest ``message`` in a transaction, and again (at ``later``) in a second one that
    starts once the first has written and waits on what it holds (``held``); the first
    commits. Returns the first's result and the second's (stored ids, rejected)."""
    with ThreadPoolExecutor(1) as pool:
        with session_scope() as session:
            first = ingest_batch(session, [message], rules=BUILTIN_RULES, now=T0)

            def again() -> tuple[list[uuid.UUID], int]:
                with session_scope() as other:
                    result = ingest_batch(other, [message], rules=BUILTIN_RULES, now=later)
                return result.stored, result.rejected

            arriving = pool.submit(again)
            wait_for(_waiting_for_a_transaction, timeout=10,
                     what=f"the second batch waiting for {held}")
        return first, arriving.result(timeout=30)


def test_one_message_stored_by_two_batches_at_once_is_stored_once():
    """The same message redelivered to a second worker while the first still holds it:
    the second's COPY waits for the first, meets its ids, and stores nothing, without a
    dead letter and without undoing the rest of its transaction."""
    _create("twice")
    message = IngestMessage("m-twice", [note("alert", "twice", priority="critical")])
    first, second = _the_same_message_twice_at_once(message, T0, "the first's rows")
    assert second == ([], 0)
    assert len(first.stored) == 1
    assert query("SELECT count(*) FROM notifications")[0][0] == 1
    assert query("SELECT count(*) FROM deliveries")[0][0] == 1
    assert query("SELECT count(*) FROM dead_letters")[0][0] == 0


def test_a_message_stored_meanwhile_is_counted_in_its_window_once():
    """The same message, whose items wait in a window, redelivered to a second worker
    while the first still holds it: the second waits on the first's new window, adds its
    items to it, then its COPY meets the first's rows. Everything since its savepoint is
    undone and done again, now seeing those rows: each item is counted once."""
    _create("again")
    message = IngestMessage("m-again", [note("alert", "again") for _ in range(2)])
    first, second = _the_same_message_twice_at_once(message, T0 + MINUTE, "the first's window")
    assert second == ([], 0)
    assert len(first.stored) == 2
    [window] = windows()
    assert (window.item_count, window.closed, window.due_at) == (2, False, DUE)
    assert query("SELECT count(*) FROM notifications")[0][0] == 2
    assert query("SELECT count(*) FROM dead_letters")[0][0] == 0
    result = flush(DUE)
    assert (result.windows, result.digests, result.notifications) == (1, 1, 2)


def test_a_preference_changed_between_two_batches_is_seen_by_the_second():
    """The first batch fills this process's cache; set_preferences commits an opt-out;
    the next batch routes by it."""
    _create("fickle")
    before = note("alert", "fickle")
    ingest([before], now=T0)
    assert status(before) == "pending"
    assert recipient_states.get_cached("fickle") is not None  # the cache holds it

    prefs("fickle", opt_out={"alert": ["*"]})
    after = note("alert", "fickle")
    ingest([after], now=T0 + MINUTE)
    assert status(after) == "suppressed"


def test_a_change_made_by_hand_in_sql_is_seen_too():
    """Not only set_preferences: any committed UPDATE of the row (a trigger bumps the
    generation), and a deleted and re-created recipient."""
    prefs("manual", min_priority="high")
    low = note("alert", "manual", priority="normal")
    ingest([low], now=T0)
    assert status(low) == "suppressed"

    with session_scope() as session:
        session.execute(text("UPDATE recipients SET preferences = '{}' WHERE id = 'manual'"))
    allowed = note("alert", "manual", priority="normal")
    ingest([allowed], now=T0 + MINUTE)
    assert status(allowed) == "pending"

    with session_scope() as session:
        session.execute(text("DELETE FROM aggregation_windows"))
        session.execute(text("DELETE FROM notifications WHERE recipient_id = 'manual'"))
        session.execute(text("DELETE FROM recipients WHERE id = 'manual'"))
        session.execute(text(
            "INSERT INTO recipients (id, preferences) VALUES ('manual', :p)"
        ), {"p": '{"opt_out": {"alert": ["*"]}}'})
    again = note("alert", "manual")
    ingest([again], now=T0 + 2 * MINUTE)
    assert status(again) == "suppressed"


def test_a_change_rolled_back_is_never_taken_for_the_current_one():
    """A batch that changed a recipient inline and rolled back leaves nothing behind in
    the cache: what the transaction wrote is used by it, never kept."""
    _create("zoned")
    ingest([note("alert", {"id": "zoned", "timezone": "Europe/Berlin"})], now=T0)
    try:
        with session_scope() as session:
            ingest_batch(session, [IngestMessage(str(uuid.uuid4()), [
                note("alert", {"id": "zoned", "timezone": "Asia/Tokyo"})])],
                rules=BUILTIN_RULES, now=T0)
            seen = recipient_states.get(raw_cursor(session), ["zoned"])["zoned"]
            assert seen.timezone == "Asia/Tokyo"  # its own write, inside the transaction
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    prefs("fickle-neighbour", min_priority="high")  # another change commits meanwhile
    with session_scope() as session:
        after = recipient_states.get(raw_cursor(session), ["zoned"])["zoned"]
    assert after.timezone == "Europe/Berlin"


def test_a_recipient_created_by_a_rolled_back_batch_is_created_again():
    """The first batch made the recipient and rolled back (another message refused): the
    cache must not remember a row that never committed, or the next batch would skip
    the recipient's insert and store notifications of a recipient that does not exist."""
    try:
        with session_scope() as session:
            ingest_batch(session, [IngestMessage(str(uuid.uuid4()), [note("alert", "newbie")])],
                         rules=BUILTIN_RULES, now=T0)
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert query("SELECT count(*) FROM recipients WHERE id = 'newbie'")[0][0] == 0
    again = note("alert", "newbie")
    assert len(ingest([again], now=T0 + MINUTE).stored) == 1
    assert status(again) == "pending"
    assert query("SELECT count(*) FROM recipients WHERE id = 'newbie'")[0][0] == 1
