"""The critical lane: a critical notification never waits for a bulk batch.

The bulk batches are made slow deterministically: the test holds a lock on the open
aggregation window every bulk item joins, so each bulk batch blocks inside Postgres for
as long as the test wants, while a critical notification touches no window.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from kombu.asynchronous.semaphore import LaxBoundedSemaphore
from sqlalchemy import Connection, text

from notifier import client
from notifier.storage.db import get_engine
from notifier.worker.lane import SlotLedger
from tests.workers import WorkerProcess, count_rows, wait_for

BULK_TYPE = "lane_test"  # the default rule: a 15-minute window of up to 10 items


def _bulk(recipient: str, count: int) -> list[dict[str, object]]:
    return [{"recipient": recipient, "type": BULK_TYPE, "title": f"bulk {i}"}
            for i in range(count)]


@contextmanager
def _window_locked(recipient: str) -> Iterator[Connection]:
    """Hold the group's open window FOR UPDATE (as a bulk batch would) until the block
    ends: every batch with an item of that group waits for it inside Postgres."""
    with get_engine().connect() as connection:
        transaction = connection.begin()
        locked = connection.execute(text(
            "SELECT id FROM aggregation_windows WHERE recipient_id = :r AND type = :t"
            " AND NOT closed FOR UPDATE"), {"r": recipient, "t": BULK_TYPE}).all()
        assert len(locked) == 1
        try:
            yield connection
        finally:
            transaction.rollback()


def _batches_waiting_on_locks() -> int:
    return count_rows(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'notifier'"
        " AND wait_event_type = 'Lock' AND datname = current_database()")


def _stored(notification_id: str) -> bool:
    return count_rows("SELECT count(*) FROM notifications WHERE id = :id",
                      id=notification_id) == 1


@pytest.mark.slow
def test_critical_is_committed_while_bulk_batches_hold_every_pool_process():
    """With -c 2, two bulk batches blocked in Postgres and more bulk waiting behind
    them, a critical notification is still stored (and its delivery row written)."""
    recipient = f"lane-{uuid.uuid4().hex[:8]}"
    # Long enough that Redis never hands the held messages out again meanwhile.
    worker = WorkerProcess.start(env={"NOTIFIER_VISIBILITY_TIMEOUT": "120"})
    try:
        client.notify_many(_bulk(recipient, 1))  # opens the group's window
        wait_for(lambda: count_rows("SELECT count(*) FROM aggregation_windows"
                                    " WHERE recipient_id = :r", r=recipient) == 1,
                 what="the window")
        with _window_locked(recipient):
            for _ in range(20):  # a backlog: two batches blocked, the rest held
                client.notify_many(_bulk(recipient, 50))
            wait_for(lambda: _batches_waiting_on_locks() == 2, timeout=30,
                     what="both pool processes blocked on the window")
            critical = client.notify(f"{recipient}-ops", "alert", "disk full",
                                     priority="critical")
            wait_for(lambda: _stored(critical), timeout=30, what="the critical notification")
            # The bulk batches are still where they were: blocked, nothing of theirs stored.
            assert _batches_waiting_on_locks() == 2
            assert count_rows("SELECT count(*) FROM notifications WHERE recipient_id = :r",
                              r=recipient) == 1
            assert count_rows("SELECT count(*) FROM deliveries WHERE notification_id = :id",
                              id=critical) == 1
        wait_for(lambda: count_rows("SELECT count(*) FROM notifications WHERE"
                                    " recipient_id = :r", r=recipient) == 1001,
                 timeout=60, what="the backlog, once the window is free")
    finally:
        worker.stop()


@contextmanager
def _key_locked(key: str) -> Iterator[Connection]:
    """Hold an idempotency key's row FOR UPDATE until the block ends: a batch repeating
    the key waits for it inside Postgres (its claim updates the row)."""
    with get_engine().connect() as connection:
        transaction = connection.begin()
        locked = connection.execute(text(
            "SELECT key FROM idempotency_keys WHERE key = :k FOR UPDATE"), {"k": key}).all()
        assert len(locked) == 1
        try:
            yield connection
        finally:
            transaction.rollback()


@pytest.mark.slow
def test_criticals_take_an_idle_process_while_the_lane_is_busy_and_no_bulk_waits():
    """An incident's burst on a quiet worker: the lane's batch is blocked in Postgres,
    nothing bulk waits, and another critical is stored on one of the ``-c`` processes
    at once instead of waiting for the lane (here for ever: ``flush_interval`` is 300 s)."""
    recipient = f"lane-{uuid.uuid4().hex[:8]}"
    key = f"incident-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess.start(env={
        "NOTIFIER_VISIBILITY_TIMEOUT": "120",
        "NOTIFIER_INGEST_FLUSH_INTERVAL": "300",
        "NOTIFIER_DATABASE_LOCK_TIMEOUT": "0",  # the blocked batch waits as long as we hold
        "NOTIFIER_CRITICAL_LANES": "1",  # with two, the second lane would take it
    })
    try:
        first = client.notify(recipient, "alert", "disk full", priority="critical",
                              idempotency_key=key)
        wait_for(lambda: _stored(first), timeout=30, what="the first critical notification")
        with _key_locked(key):
            client.notify(recipient, "alert", "disk full again", priority="critical",
                          idempotency_key=key)
            wait_for(lambda: _batches_waiting_on_locks() == 1, timeout=30,
                     what="the lane's batch blocked on the key")
            other = client.notify(f"{recipient}-ops", "alert", "load high",
                                  priority="critical")
            wait_for(lambda: _stored(other), timeout=30,
                     what="the other critical, beside the blocked lane")
            assert _batches_waiting_on_locks() == 1  # the lane's batch still waits
        wait_for(lambda: count_rows("SELECT duplicates FROM idempotency_keys WHERE key = :k",
                                    k=key) == 1,
                 timeout=30, what="the repeat counted, once the key is free")
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_critical_starts_on_the_second_lane_while_the_first_is_busy_and_bulk_waits():
    """Two lanes (the default): the first lane's batch is blocked in Postgres, both
    ``-c`` processes hold blocked bulk batches with more bulk waiting behind them, and
    another critical is still stored at once, on the second lane. With one lane it
    gathers behind the first lane's batch, however long that takes."""
    recipient = f"lane-{uuid.uuid4().hex[:8]}"
    key = f"incident-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess.start(env={
        "NOTIFIER_VISIBILITY_TIMEOUT": "120",
        "NOTIFIER_DATABASE_LOCK_TIMEOUT": "0",  # blocked batches wait as long as we hold
    })
    try:
        client.notify_many(_bulk(recipient, 1))  # opens the group's window
        first = client.notify(f"{recipient}-ops", "alert", "disk full", priority="critical",
                              idempotency_key=key)
        wait_for(lambda: _stored(first) and count_rows(
            "SELECT count(*) FROM aggregation_windows WHERE recipient_id = :r",
            r=recipient) == 1, what="the window and the first critical")
        with _window_locked(recipient), _key_locked(key):
            for _ in range(20):  # a backlog: two batches blocked, the rest held
                client.notify_many(_bulk(recipient, 50))
            wait_for(lambda: _batches_waiting_on_locks() == 2, timeout=30,
                     what="both -c processes blocked on the window")
            client.notify(f"{recipient}-ops", "alert", "disk full again", priority="critical",
                          idempotency_key=key)
            wait_for(lambda: _batches_waiting_on_locks() == 3, timeout=30,
                     what="the first lane's batch blocked on the key")
            other = client.notify(f"{recipient}-db", "alert", "load high", priority="critical")
            wait_for(lambda: _stored(other), timeout=30, what="the critical on the second lane")
            assert _batches_waiting_on_locks() == 3  # everything else still waits
        wait_for(lambda: count_rows("SELECT count(*) FROM notifications WHERE"
                                    " recipient_id = :r", r=recipient) == 1001,
                 timeout=60, what="the backlog, once the window is free")
    finally:
        worker.stop()


# --- the slot accounting the lane relies on ---------------------------------------------


def _pool_releases(semaphore: LaxBoundedSemaphore, jobs: int) -> None:
    """What the pool does when ``jobs`` jobs end: one release each, whoever took them."""
    for _ in range(jobs):
        semaphore.release()


def test_a_lane_job_ending_while_a_task_waits_costs_no_slot():
    """Two slots held by bulk batches, a task waiting for one, a lane job ends: the
    pool's release for the lane job is kept, the task waits for a bulk batch to end,
    so the slots never exceed two, not even for a moment (a -c 1 worker whose lane
    ended while a delivery waited sent two deliveries at once)."""
    semaphore = LaxBoundedSemaphore(2)
    ledger = SlotLedger(semaphore)
    granted: list[str] = []
    for _ in range(2):
        assert ledger.take(lambda: granted.append("bulk"))
        ledger.spend()
    semaphore.acquire(granted.append, "task")  # a delivery task waits
    ledger.lane_started()
    _pool_releases(semaphore, 1)  # the lane job ends...
    ledger.lane_ended()
    assert granted == ["bulk", "bulk"]  # ...and its release went to no task
    _pool_releases(semaphore, 1)  # a bulk batch ends: the task takes its slot
    assert granted == ["bulk", "bulk", "task"]
    _pool_releases(semaphore, 2)  # the other bulk batch and the task end
    assert (semaphore.value, semaphore.initial_value) == (2, 2)


def _one_slot_a_task_waiting_a_lane_running() -> tuple[
    LaxBoundedSemaphore, SlotLedger, list[str]
]:
    """A ``-c 1`` worker's semaphore: a task running on the slot, another waiting for
    it, and a lane job started; ``granted`` lists the tasks run, in order."""
    semaphore = LaxBoundedSemaphore(1)
    ledger = SlotLedger(semaphore)
    granted: list[str] = []
    semaphore.acquire(granted.append, "running task")
    semaphore.acquire(granted.append, "waiting task")
    ledger.lane_started()
    return semaphore, ledger, granted


def test_a_task_ending_while_the_lane_runs_hands_its_slot_on_at_the_next_settle():
    """The release of a job that ends while a lane job runs is taken by the lane job's
    keep; settling (as the batches' dispatch does) hands that slot to the waiting task
    at once and keeps the next release, the lane job's own, instead."""
    semaphore, ledger, granted = _one_slot_a_task_waiting_a_lane_running()
    _pool_releases(semaphore, 1)  # the running task ends: its release is kept...
    assert granted == ["running task"]
    ledger.settle()  # ...and handed on
    assert granted == ["running task", "waiting task"]
    _pool_releases(semaphore, 1)  # the lane job ends: kept, nobody else runs
    ledger.lane_ended()
    semaphore.acquire(granted.append, "next task")
    assert granted == ["running task", "waiting task"]
    _pool_releases(semaphore, 1)  # the waiting task ends: the next one runs
    assert granted == ["running task", "waiting task", "next task"]
    _pool_releases(semaphore, 1)
    assert (semaphore.value, semaphore.initial_value) == (1, 1)


def test_two_lanes_taking_turns_never_keep_a_bulk_batch_waiting_for_its_slot():
    """With two lanes whose jobs overlap all the time (criticals flowing), there is
    always a keep waiting: each bulk batch's release went to one, and a bulk batch
    waiting for a slot waited until both lanes were idle at once. Settled, it gets
    the slot as soon as the batch before it ends, and the count ends right."""
    semaphore = LaxBoundedSemaphore(1)
    ledger = SlotLedger(semaphore)
    granted: list[str] = []
    assert ledger.take(lambda: granted.append("bulk 0"))
    ledger.spend()  # bulk batch 0 runs on the one slot
    ledger.lane_started()  # lane job A
    for n in range(1, 6):
        ledger.lane_started()  # the next lane job starts before the last one ends
        assert not ledger.take(lambda n=n: granted.append(f"bulk {n}"))
        _pool_releases(semaphore, 1)  # the running bulk batch ends
        ledger.settle()
        assert granted == [f"bulk {i}" for i in range(n + 1)]
        ledger.spend()
        _pool_releases(semaphore, 1)  # the older lane job ends: kept
        ledger.lane_ended()
        assert semaphore.value == 0  # the bulk batch holds the slot
    _pool_releases(semaphore, 1)  # the last lane job ends
    ledger.lane_ended()
    _pool_releases(semaphore, 1)  # the last bulk batch ends
    assert (semaphore.value, semaphore.initial_value) == (1, 1)
    assert ledger._keeps_waiting() == 0


def test_a_lost_lane_process_whose_release_comes_late_leaves_the_count_right():
    """A lane job whose process died ends (its error callback) before the pool's
    release for the lost process: settling meanwhile hands nothing on."""
    semaphore, ledger, granted = _one_slot_a_task_waiting_a_lane_running()
    ledger.lane_ended()  # the error callback, before any release
    ledger.settle()
    assert granted == ["running task"]
    _pool_releases(semaphore, 1)  # the pool replaces the process: kept
    ledger.settle()
    assert granted == ["running task"]
    _pool_releases(semaphore, 1)  # the running task ends: the waiting one runs
    assert granted == ["running task", "waiting task"]
    _pool_releases(semaphore, 1)
    assert (semaphore.value, semaphore.initial_value) == (1, 1)


def test_a_lane_job_ending_on_an_idle_worker_leaves_every_slot():
    semaphore = LaxBoundedSemaphore(2)
    ledger = SlotLedger(semaphore)
    ledger.lane_started()
    _pool_releases(semaphore, 1)
    ledger.lane_ended()
    assert (semaphore.value, semaphore.initial_value) == (2, 2)


def test_a_bulk_batch_waits_for_a_slot_behind_the_tasks_already_waiting():
    semaphore = LaxBoundedSemaphore(1)
    ledger = SlotLedger(semaphore)
    order: list[str] = []
    semaphore.acquire(order.append, "running task")
    semaphore.acquire(order.append, "waiting task")
    assert not ledger.take(lambda: order.append("bulk"))
    assert not ledger.take(lambda: order.append("bulk again"))  # one wait at a time
    _pool_releases(semaphore, 2)
    assert order == ["running task", "waiting task", "bulk"]
    ledger.spend()
    _pool_releases(semaphore, 1)
    assert semaphore.value == 1
