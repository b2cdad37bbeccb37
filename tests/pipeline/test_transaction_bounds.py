"""Ingest's (and the flush's, the sweep's) transactions are bounded for themselves alone
(``NOTIFIER_DATABASE_IDLE_TIMEOUT``, ``NOTIFIER_DATABASE_LOCK_TIMEOUT``: ``SET LOCAL``),
on the run's real Postgres with real concurrent sessions.

A worker host cut off in the middle of an ingest is simulated by a session that ran an
ingest batch (it holds its group's window row) and then sends nothing more: Postgres
cannot tell that from a slow peer. Another worker's ingest of the same group then waits
for the idle timeout, not until the server's TCP keepalives notice (or for ever, here).
"""

from __future__ import annotations

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from notifier.pipeline.delivery import Claim
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.worker import tasks
from tests.conftest import DATABASE_URL
from tests.pipeline.helpers import digests, flush, note, query

#: The worker's bounds as a test can wait for them: the idle timeout short, the lock
#: timeout far above it (a waiter outlasts an idle holder).
IDLE_BOUNDED = get_settings().model_copy(
    update={"database_idle_timeout": 1.0, "database_lock_timeout": 60.0})


def _message(recipient: str) -> IngestMessage:
    return IngestMessage(str(uuid.uuid4()), [note("alert", recipient)])


def _stored_ids(recipient: str) -> list[str]:
    return [str(row[0]) for row in query(
        "SELECT id FROM notifications WHERE recipient_id = :r", r=recipient)]


def _cut_off_mid_ingest(stack: ExitStack, message: IngestMessage, settings: object) -> None:
    """A worker's ingest transaction that has added to its group's window (and so
    holds that row) when its host is cut off: nothing more is ever sent on it."""
    session = stack.enter_context(session_scope(bounds=settings))  # type: ignore[arg-type]
    ingest_batch(session, [message], rules=BUILTIN_RULES)


def test_a_worker_cut_off_mid_ingest_holds_its_window_for_the_idle_timeout_only(monkeypatch):
    """The other worker's batch of the same group is stored once the cut one's session
    is ended (1 s); the cut one's batch fails with an error of Postgres's (back to its
    queue, uncounted) and, delivered again, is stored once: three members, one digest."""
    monkeypatch.setattr(tasks, "_settings", IDLE_BOUNDED)
    tasks.store_messages([_message("cut-user")])  # the group's window, committed
    cut, other = _message("cut-user"), _message("cut-user")
    stack = ExitStack()
    _cut_off_mid_ingest(stack, cut, IDLE_BOUNDED)
    with ThreadPoolExecutor(1) as pool:
        arriving = pool.submit(tasks.store_messages, [other])
        # Without the bound it would wait for as long as the cut session lives: here,
        # for ever (the session is never used again until the end of the test).
        try:
            assert len(arriving.result(timeout=30).stored) == 1
        finally:
            if not arriving.done():  # the test fails; it must not hang as well
                stack.close()
    with pytest.raises(Exception) as ended:  # the cut worker's commit, when it comes
        stack.close()
    assert tasks.database_unavailable(ended.value), ended.value
    assert str(other.payload[0]["id"]) in _stored_ids("cut-user")  # type: ignore[index]
    assert str(cut.payload[0]["id"]) not in _stored_ids("cut-user")  # type: ignore[index]

    assert len(tasks.store_messages([cut]).stored) == 1  # the broker hands it out again
    assert len(tasks.store_messages([cut]).stored) == 0  # and once more: stored once
    assert len(_stored_ids("cut-user")) == 3
    result = flush(datetime.now(UTC) + timedelta(hours=1))
    assert (result.windows, result.digests) == (1, 1)
    [digest] = digests()
    assert Counter(map(str, digest.notification_ids)) == Counter(_stored_ids("cut-user"))
    assert query("SELECT count(*) FROM dead_letters")[0][0] == 0


def test_a_wait_on_a_holder_that_is_not_idle_ends_at_the_lock_timeout(monkeypatch):
    """A holder the idle timeout cannot end (a session of its own settings, or one
    blocked sending to a peer that is gone): the waiting batch fails at the lock
    timeout, its own locks go, and it is neither stored nor dead-lettered but left to
    its queue (an error of Postgres's); once the holder ends it is stored once."""
    settings = get_settings().model_copy(update={
        "database_idle_timeout": 0.0, "database_lock_timeout": 0.3,
        "ingest_commit_attempts": 2})
    monkeypatch.setattr(tasks, "_settings", settings)
    tasks.store_messages([_message("held-user")])
    holder, waiting = _message("held-user"), _message("held-user")
    with ExitStack() as stack:
        session = stack.enter_context(session_scope())  # unbounded
        ingest_batch(session, [holder], rules=BUILTIN_RULES)
        with pytest.raises(Exception) as failed:
            tasks.store_messages([waiting])
        error = getattr(failed.value, "orig", None) or failed.value
        assert getattr(error, "sqlstate", None) == "55P03", error  # lock_not_available
        assert tasks.database_unavailable(failed.value)
        assert len(_stored_ids("held-user")) == 1
    assert len(tasks.store_messages([waiting]).stored) == 1
    assert len(_stored_ids("held-user")) == 3
    assert query("SELECT count(*) FROM dead_letters")[0][0] == 0


def test_the_bounds_end_with_their_transaction(monkeypatch):
    """The pooled connection keeps no setting after a bounded transaction (the next
    transaction on it, maybe another client's behind a pooler, meets the server's own),
    and a delivery claim's transaction has no idle timeout, whatever the session has."""
    settings = IDLE_BOUNDED
    engine_url = f"{DATABASE_URL}?connect_timeout=7"  # an engine (a pool) of its own
    read = text("SELECT pg_backend_pid(),"
                " current_setting('idle_in_transaction_session_timeout'),"
                " current_setting('lock_timeout')")
    with session_scope(engine_url, bounds=settings) as session:
        pid, idle, lock = session.execute(read).one()
    assert (idle, lock) == ("1s", "1min")
    with session_scope(engine_url) as session:
        after = session.execute(read).one()
        defaults = session.execute(text(
            "SELECT reset_val FROM pg_settings WHERE name IN"
            " ('idle_in_transaction_session_timeout', 'lock_timeout') ORDER BY name")
        ).scalars().all()
    assert after[0] == pid  # the same server session
    assert [after[1], after[2]] != ["1s", "1min"]
    assert [int(v) for v in defaults] == [0, 0]  # this run's Postgres: both off
    assert (after[1], after[2]) == ("0", "0")

    from notifier.worker.transactions import transaction

    with transaction(settings) as tx:
        tx.cursor.execute("SELECT current_setting('lock_timeout')")
        assert tx.cursor.fetchone() == ("1min",)
    with Claim() as claim:
        claim.hold()
        row = claim.driver.execute(
            "SELECT current_setting('idle_in_transaction_session_timeout')").fetchone()
        assert row == ("0",)
