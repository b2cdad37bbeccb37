"""The flush loop in real workers: a process beside each worker's pool that flushes
windows when they fall due, armed by beat's key, sharing windows between workers, and
stopping (or starting again) with its worker.

No beat runs here: the tests arm the loops the way beat's tick does (the Redis key), so
whatever is flushed was flushed by a loop, not by a tick.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.settings import get_settings
from notifier.storage.db import session_scope
from notifier.storage.state import state_redis
from notifier.worker.flush_loop import ARM_KEY, HELD_NAP, arm, armed_for, next_sleep
from tests.pipeline.helpers import MINUTE, digests, ids, ingest, note, query, windows
from tests.workers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow

ALERT_WINDOW = 5 * MINUTE  # the built-in alert rule: 5 minutes, closes early at 3
_STARTED = re.compile(r"flush loop started \(pid (\d+)\)")
_STOPPED = re.compile(r"flush loop stopped \(pid \d+\), having flushed (\d+) windows")


def arm_for_a_minute() -> None:
    """What beat's tick does, for long enough that no tick is needed during a test."""
    arm(state_redis(), get_settings().model_copy(update={"flush_interval": 12.0}))
    assert armed_for(state_redis()) > 30


def loop_pids(worker: WorkerProcess) -> list[int]:
    return [int(pid) for pid in _STARTED.findall(worker.log())]


def wait_for_loop(worker: WorkerProcess, started: int = 1) -> int:
    """The pid of the worker's loop once it has started (the ``started``-th time)."""
    wait_for(lambda: len(loop_pids(worker)) >= started, 30, "the flush loop to start")
    return loop_pids(worker)[started - 1]


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def due_in(
    seconds: float, groups: int = 1, size: int = 2, prefix: str = "loop"
) -> list[list[dict]]:
    """``groups`` alert groups of ``size`` items (below the maximum: only time closes
    them) whose windows fall due ``seconds`` from now."""
    opened = datetime.now(UTC) - ALERT_WINDOW + timedelta(seconds=seconds)
    made = [[note("alert", f"{prefix}-{g:04d}") for _ in range(size)] for g in range(groups)]
    for start in range(0, groups, 100):
        ingest([n for group in made[start:start + 100] for n in group], now=opened)
    return made


def digest_ids_of(group: list[dict]) -> set[uuid.UUID]:
    rows = query("SELECT DISTINCT digest_id FROM notifications WHERE id = ANY(:ids)",
                 ids=ids(group))
    return {row[0] for row in rows}


@pytest.fixture
def loop_worker() -> Iterator[WorkerProcess]:
    worker = WorkerProcess.start()
    try:
        wait_for_loop(worker)
        yield worker
    finally:
        worker.stop()


def test_a_window_due_in_300_ms_is_flushed_by_the_loop_without_a_beat_tick(loop_worker):
    """The loop sleeps until the window's due time and flushes it then: no beat runs,
    and beat's interval (a second) has nothing to do with it."""
    arm_for_a_minute()
    [group] = due_in(0.3)
    [window] = windows()

    wait_for(lambda: not windows(), 30, "the loop to flush the window")
    [digest] = digests()
    assert digest.notification_ids == ids(group)
    assert digest.created_at >= window.due_at  # when it fell due, not before
    [delivery] = query("SELECT * FROM deliveries WHERE digest_id = :id", id=digest.id)
    assert delivery.queued_at is not None  # its task was published after the commit


def test_an_unarmed_loop_flushes_nothing_until_beat_arms_it(loop_worker):
    """Without beat's key the loop leaves due windows alone (a stopped beat stops the
    flush, as it always did); the key makes it flush them at once."""
    state_redis().delete(ARM_KEY)
    [group] = due_in(-1.0)
    time.sleep(2.5)  # two looks at the key, at least
    assert len(windows()) == 1 and digests() == []

    arm_for_a_minute()
    wait_for(lambda: not windows(), 30, "the armed loop to flush the window")
    assert [d.notification_ids for d in digests()] == [ids(group)]


def test_two_loops_never_produce_two_digests_for_a_group():
    """Two workers, two loops, 300 windows falling due at the same moment in chunks of
    five: SKIP LOCKED shares them out, both loops take part, and every group becomes
    exactly one digest with one delivery."""
    env = {"NOTIFIER_FLUSH_BATCH_SIZE": "5"}
    workers = [WorkerProcess.start(env=env) for _ in range(2)]
    try:
        for worker in workers:
            wait_for_loop(worker)
        arm_for_a_minute()
        groups = due_in(1.5, groups=300, prefix="pair")
        wait_for(lambda: not windows(), 120, "the loops to flush every window")
    finally:
        for worker in workers:
            worker.stop()

    flushed = [[int(n) for n in _STOPPED.findall(worker.log())] for worker in workers]
    assert all(len(counts) == 1 and counts[0] > 0 for counts in flushed), flushed  # both
    assert sum(counts[0] for counts in flushed) == len(groups)
    assert len(digests()) == len(groups)
    members = [m for d in digests() for m in d.notification_ids]
    assert len(members) == len(set(members)) == 2 * len(groups)
    for group in groups:
        assert len(digest_ids_of(group)) == 1
    [(digested, deliveries)] = query(
        "SELECT (SELECT count(*) FROM notifications WHERE status = 'digested'),"
        " (SELECT count(DISTINCT digest_id) FROM deliveries WHERE digest_id IS NOT NULL)")
    assert (digested, deliveries) == (2 * len(groups), len(groups))
    assert query("SELECT count(*) FROM deliveries")[0][0] == len(groups)


def test_the_loop_stops_when_its_worker_gets_sigterm(loop_worker):
    """SIGTERM to the worker's main process alone (``docker stop``): the worker's
    warm shutdown stops its loop, which logs that it stopped, and nothing is left."""
    pid = loop_pids(loop_worker)[0]
    loop_worker.process.send_signal(signal.SIGTERM)
    loop_worker.process.wait(timeout=30)
    assert f"flush loop stopped (pid {pid})" in loop_worker.log()
    wait_for(lambda: not running(pid), 10, "the loop process to be gone")


def test_the_loop_ends_when_its_worker_is_killed(loop_worker):
    """SIGKILL to the worker's main process: no stop request ever comes, and the loop
    ends by itself when it sees its worker gone."""
    pid = loop_pids(loop_worker)[0]
    arm_for_a_minute()  # busy looking for windows, not waiting for the key
    os.kill(loop_worker.process.pid, signal.SIGKILL)
    loop_worker.process.wait(timeout=10)
    try:
        wait_for(lambda: not running(pid), 15, "the orphaned loop to end")
    finally:
        loop_worker.kill()  # the pool processes left behind


def test_a_loop_that_dies_is_started_again(loop_worker):
    """The worker watches its loop: one killed (an OOM killer, say) is replaced, and
    the new one flushes."""
    first = loop_pids(loop_worker)[0]
    os.kill(first, signal.SIGKILL)
    second = wait_for_loop(loop_worker, started=2)
    assert second != first and running(second)
    arm_for_a_minute()
    due_in(0.0)
    wait_for(lambda: not windows(), 30, "the new loop to flush the window")
    assert len(digests()) == 1


def test_with_the_loop_off_beat_s_tick_flushes(tmp_path):
    """NOTIFIER_FLUSH_LOOP=false: the worker runs no loop, and beat's tick flushes what
    is due, as before the loop."""
    worker = WorkerProcess.start("-B", "--schedule", str(tmp_path / "beat-schedule"),
                                 env={"NOTIFIER_FLUSH_LOOP": "false"})
    try:
        [group] = due_in(0.0)
        wait_for(lambda: not windows(), 60, "beat's tick to flush the window")
        assert "notifier.flush_windows" in worker.log()
        assert loop_pids(worker) == []
    finally:
        worker.stop()
    assert [d.notification_ids for d in digests()] == [ids(group)]
    assert armed_for(state_redis()) == 0  # nobody armed a loop


_CHUNKS = re.compile(r"flush loop stopped .* in (\d+) chunks, (\d+) of them empty")


def test_an_idle_loop_backs_off_and_a_group_that_fills_wakes_it_at_once():
    """Nothing to flush: the loop looks again after the poll (0.2 s), doubling on each
    empty look up to beat's tick (a minute here), so over 7 idle seconds it claims a
    handful of times where polling would claim 35. A group that fills meanwhile (its
    window due at once) wakes it through ingest's NOTIFY: flushed then, not at the end
    of the back-off it was in (6.4 s, which ends at least 5 s after the group filled)."""
    worker = WorkerProcess.start(env={"NOTIFIER_FLUSH_INTERVAL": "60"})
    try:
        wait_for_loop(worker)
        arm_for_a_minute()
        time.sleep(7)
        group = [note("alert", "backoff") for _ in range(3)]  # the alert rule closes at 3
        with session_scope() as session:  # on Postgres's clock, as a worker ingests
            ingest_batch(session, [IngestMessage(str(uuid.uuid4()), group)],
                         rules=BUILTIN_RULES)
        wait_for(lambda: not windows(), 30, "the loop to flush the full group")
    finally:
        worker.stop()

    [digest] = digests()
    assert digest.notification_ids == ids(group)
    late = (digest.created_at - digest.window_end).total_seconds()
    assert 0 <= late < 4, late
    [(chunks, empty)] = [tuple(map(int, m)) for m in _CHUNKS.findall(worker.log())]
    assert chunks - empty == 1 and 3 <= empty <= 15, (chunks, empty)


def test_the_loop_sleeps_until_the_next_due_window_and_backs_off_when_empty():
    """``next_sleep``: never past the next due window; a chunk that took something goes
    again at once if more is due; empty chunks in a row double the nap on held windows
    (up to the poll) and the idle look (up to beat's tick when listening, else the poll)."""
    settings = get_settings().model_copy(update={"flush_loop_poll": 0.2,
                                                 "flush_interval": 1.0})
    assert next_sleep(settings, 0.05, 0, 5, True) == 0.05  # due soon: sleep until then
    assert next_sleep(settings, -0.1, 3, 0, True) == 0.0  # fell due meanwhile
    held = [next_sleep(settings, -0.1, 0, empty, True) for empty in range(1, 7)]
    assert held == [HELD_NAP, 2 * HELD_NAP, 4 * HELD_NAP, 8 * HELD_NAP, 0.2, 0.2]
    idle = [next_sleep(settings, None, 0, empty, True) for empty in range(1, 6)]
    assert idle == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert next_sleep(settings, 30.0, 0, 10**6, True) == 1.0  # idle for days: still bounded
    assert [next_sleep(settings, None, 0, empty, False) for empty in (1, 9)] == [0.2, 0.2]
