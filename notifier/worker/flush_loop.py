"""The flush loop: due aggregation windows are flushed when they fall due, not at beat's
next tick.

Each worker that consumes beat's queue (``BEAT_QUEUE``) runs one loop, in a process of
its own beside the pool (a bootstep starts it, restarts it if it dies, and stops it
with the worker), so flushing never takes a pool slot and never holds up the worker's
consumer. The loop sleeps until the next window is due, by Postgres's clock (the server
computes ``min(due_at) - now``: a host whose clock is off neither flushes early nor
sleeps long), then flushes what is due a chunk per transaction. Loops of several
workers share the windows: each claims with ``FOR UPDATE SKIP LOCKED``, so a window is
flushed by one of them, once.

A loop that finds nothing to flush backs off (``next_sleep``): an idle one looks every
``flush_loop_poll``, doubling up to beat's tick (``flush_interval``); one that finds
the due windows held by another loop naps ``HELD_NAP``, doubling up to the poll. It
still never sleeps past the next due window, and it ``LISTEN``s on ``FLUSH_CHANNEL``:
an ingest that makes a window due sooner than a loop's longest sleep (a group filled,
a short window opened) wakes it at its commit (``windows.assign_windows``). Behind a
pooler (PgBouncer), where ``LISTEN`` cannot work, an idle loop looks every
``flush_loop_poll``, as before.

Beat still owns *whether* windows are flushed: its tick (``notifier.flush_windows``)
arms the loops through a Redis key that lives for ``ARMED_TICKS`` ticks, set when beat
publishes the tick and again when a worker runs it. A stopped beat stops the flush
within those ticks, as before; with ``NOTIFIER_FLUSH_LOOP=false`` the tick flushes
itself, as before.

The tick, the sweep and the heartbeat run with task events off, so Flower's task list
shows the work (ingest batches, deliveries) instead of a row per second of housekeeping.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, cast

import psycopg
import redis
from celery import bootsteps, signals

from notifier.pipeline.flush import FlushResult, flush_due_windows, seconds_until_next_due
from notifier.pipeline.ingest import describe_exception
from notifier.pipeline.rules import get_rules
from notifier.pipeline.windows import FLUSH_CHANNEL
from notifier.settings import Settings, get_settings
from notifier.storage.db import get_engine
from notifier.storage.state import StateRedis, state_redis
from notifier.worker import metrics
from notifier.worker.app import app
from notifier.worker.batch_sizing import delivery_sizer
from notifier.worker.queues import BEAT_QUEUE
from notifier.worker.tasks import publish
from notifier.worker.transactions import transaction

log = logging.getLogger(__name__)

#: The Redis key that arms the flush loops; its time to live is beat's promise.
ARM_KEY = "notifier.flush-loop"
#: The key lives this many beat ticks: a tick or two lost or expired stops nothing.
ARMED_TICKS = 5
#: Seconds an unarmed loop waits before it looks at the key again.
ARM_CHECK = 1.0
#: Seconds to wait when the due windows left are held by another flush (or an ingest
#: adding to them): long enough not to spin on them, short against the poll; doubled
#: on each such empty claim in a row, up to the poll (the loop holding them is
#: flushing them meanwhile).
HELD_NAP = 0.02
#: Seconds between two tries to open the loop's ``LISTEN`` connection after it failed.
LISTEN_RETRY = 30.0
#: Seconds to wait after an error (Postgres or Redis away), doubling up to the maximum.
ERROR_BACKOFF = (0.5, 5.0)
#: Seconds a stopping worker gives its loop to finish the chunk in hand.
STOP_TIMEOUT = 15.0
#: Seconds between the supervisor's checks that its loop is alive.
SUPERVISE_INTERVAL = 2.0
#: Seconds between the loop's log lines of what it flushed (a chunk may be one window:
#: a line per chunk would be hundreds a second).
SUMMARY_INTERVAL = 10.0
FLUSH_TASK = "notifier.flush_windows"


# --- arming (beat's side) -------------------------------------------------------------


def arm(client: StateRedis, settings: Settings) -> None:
    """Keep the flush loops running for ``ARMED_TICKS`` beat ticks."""
    client.set(ARM_KEY, "1", px=max(1, round(ARMED_TICKS * settings.flush_interval * 1000)))


def armed_for(client: StateRedis) -> float:
    """Seconds the loops stay armed (0: not armed)."""
    ttl = client.pttl(ARM_KEY)
    return ttl / 1000 if isinstance(ttl, int) and ttl > 0 else 0.0


@app.task(name=FLUSH_TASK, acks_late=True, send_events=False)
def flush_windows() -> dict[str, int]:
    """Beat's flush tick: arm the workers' flush loops, or, with the loop off
    (``NOTIFIER_FLUSH_LOOP=false``), flush what is due now."""
    settings = get_settings()
    if settings.flush_loop:
        arm(state_redis(), settings)
        return {"armed": 1}
    return flush_until_done(settings)


def _arm_on_publish(**_: Any) -> None:
    """In beat, as it sends a tick: the loops are armed at once, even while the tick
    waits in a busy queue."""
    settings = get_settings()
    if not settings.flush_loop:
        return
    try:
        arm(state_redis(), settings)
    except redis.RedisError as exc:  # the worker that runs the tick arms them too
        log.warning("could not arm the flush loops: %s", exc)


signals.after_task_publish.connect(_arm_on_publish, sender=FLUSH_TASK, weak=False)


# --- flushing -------------------------------------------------------------------------


def flush_chunk(settings: Settings, batch_size: Any = None) -> FlushResult:
    """Flush up to ``flush_batch_size`` windows due by Postgres's clock in one
    transaction; their delivery tasks are published once it commits. A chunk that
    comes back short also says, in the same transaction, when the next window is due
    (``FlushResult.next_due_in``)."""
    asked = 0.0
    with transaction(settings) as tx:
        result = flush_due_windows(tx.cursor, get_rules(), settings, batch_size=batch_size)
        if result.windows < settings.flush_batch_size:
            result.next_due_in = seconds_until_next_due(tx.cursor)
            asked = time.monotonic()
        tx.after_commit(publish, result.tasks)
    if result.next_due_in is not None:  # less the commit and the publishing since
        result.next_due_in -= time.monotonic() - asked
    metrics.record_flush(result.windows, result.digests, result.digested)
    return result


@dataclass
class FlushTotals:
    windows: int = 0
    digests: int = 0
    notifications: int = 0

    def add(self, result: FlushResult) -> None:
        self.windows += result.windows
        self.digests += result.digests
        self.notifications += result.notifications

    def __str__(self) -> str:
        return (f"{self.windows} windows: {self.digests} digests of"
                f" {self.notifications} notifications")


def flush_until_done(settings: Settings, batch_size: Any = None) -> dict[str, int]:
    """Flush chunk after chunk while they come back full (a burst is cleared at once)."""
    totals = FlushTotals()
    while True:
        result = flush_chunk(settings, batch_size)
        if result.windows:
            log.info("flushed %s", FlushTotals(result.windows, result.digests,
                                               result.notifications))
        totals.add(result)
        if result.windows < settings.flush_batch_size:
            return {"windows": totals.windows, "digests": totals.digests,
                    "notifications": totals.notifications}


def next_sleep(
    settings: Settings, due_in: float | None, claimed: int, empty: int, listening: bool,
) -> float:
    """How long the loop may sleep after a chunk of ``claimed`` windows, the ``empty``-th
    empty one in a row (0: it took some), when the next window is due in ``due_in``
    seconds by Postgres's clock (None: none waits).

    Never past the next due window. One already due goes at once if the chunk took
    something (it fell due meanwhile); after an empty chunk it is held by someone else
    (another loop, an ingest adding to it): nap ``HELD_NAP``, doubling per empty chunk
    up to the poll. With nothing due, look again after the poll, doubling per empty
    chunk up to beat's tick if ``listening`` (an ingest that makes a window due sooner
    wakes the loop), else after the poll (how late a window closed early may be)."""
    poll = settings.flush_loop_poll
    doubled = 2.0 ** min(max(empty - 1, 0), 30)  # bounded: a loop idle for days
    if due_in is not None and due_in <= 0:
        return 0.0 if claimed else min(HELD_NAP * doubled, poll)
    longest = max(poll, settings.flush_interval) if listening else poll
    cap = min(poll * doubled, longest)
    return cap if due_in is None else min(due_in, cap)


# --- the loop (in its own process) ----------------------------------------------------


class _Stop(Exception):
    """Raised out of a sleep by SIGTERM/SIGINT: the loop ends between two chunks."""


@dataclass
class FlushLoop:
    """One worker's loop. ``parent_pid``: the worker's main process; the loop ends
    when it is gone (a worker killed with SIGKILL leaves no loop behind)."""

    settings: Settings
    parent_pid: int
    stopping: bool = False
    sleeping: bool = False
    armed_until: float = 0.0
    #: Since the start, and since the last log line (``SUMMARY_INTERVAL``).
    total: FlushTotals = field(default_factory=FlushTotals)
    recent: FlushTotals = field(default_factory=FlushTotals)
    logged_at: float = field(default_factory=time.monotonic)
    #: Chunks taken since the start, those that found nothing, and those in a row now.
    chunks: int = 0
    empty_chunks: int = 0
    empty_in_a_row: int = 0
    listener: Listener | None = None

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        sizer = delivery_sizer(self.settings)
        failures = 0
        log.info("flush loop started (pid %d)", os.getpid())
        try:
            while not self.stopping and self._worker_alive():
                try:
                    wait = self._step(sizer)
                    failures = 0
                except Exception as exc:  # Postgres or Redis away: try again later
                    wait = min(ERROR_BACKOFF[0] * 2 ** failures, ERROR_BACKOFF[1])
                    failures += 1
                    log.warning("flush loop: %s; again in %.0f s", describe_exception(exc),
                                wait)
                if wait:
                    self._sleep(wait)
        except _Stop:
            pass
        finally:
            if self.listener is not None:
                self.listener.close()
        log.info("flush loop stopped (pid %d), having flushed %s in %d chunks, %d of them"
                 " empty", os.getpid(), self.total, self.chunks, self.empty_chunks)

    def _step(self, sizer: Any) -> float:
        """One turn: flush a chunk if armed; returns how long to sleep before the next."""
        if not self._armed():
            return ARM_CHECK
        if self.listener is None:
            self.listener = Listener.open()
        else:
            self.listener.drain()  # what woke it is seen by this chunk
        result = flush_chunk(self.settings, sizer)
        self._count(result)
        if result.windows >= self.settings.flush_batch_size:
            return 0.0  # a full chunk: more may be due
        return next_sleep(self.settings, result.next_due_in, result.windows,
                          self.empty_in_a_row, self._listening())

    def _listening(self) -> bool:
        return self.listener is not None and self.listener.ready()

    def _count(self, result: FlushResult) -> None:
        self.chunks += 1
        if result.windows:
            self.empty_in_a_row = 0
        else:
            self.empty_chunks += 1
            self.empty_in_a_row += 1
        self.total.add(result)
        self.recent.add(result)
        now = time.monotonic()
        if self.recent.windows and now - self.logged_at >= SUMMARY_INTERVAL:
            log.info("flushed %s in %.0f s", self.recent, now - self.logged_at)
            self.recent, self.logged_at = FlushTotals(), now

    def _armed(self) -> bool:
        now = time.monotonic()
        if now >= self.armed_until:
            self.armed_until = now + armed_for(state_redis())
        return now < self.armed_until

    def _worker_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _sleep(self, seconds: float) -> None:
        """Sleep, a second at a time at most, while the worker lives (a long back-off
        must not keep an orphaned loop around); a notification on ``FLUSH_CHANNEL`` ends
        it at once."""
        deadline = time.monotonic() + seconds
        self.sleeping = True
        try:
            while not self.stopping and self._worker_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if self._listening():
                    assert self.listener is not None
                    if self.listener.wait(min(left, 1.0)):
                        return
                else:
                    time.sleep(min(left, 1.0))
        finally:
            self.sleeping = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Stop after the chunk in hand (never inside its transaction or publishing);
        a sleeping loop stops at once."""
        self.stopping = True
        if self.sleeping:
            raise _Stop


class Listener:
    """The loop's ``LISTEN`` on ``FLUSH_CHANNEL``: a connection of its own, in
    autocommit. Lost, it is opened again after ``LISTEN_RETRY``; meanwhile the loop
    looks every ``flush_loop_poll``.

    Only straight to Postgres: behind a pooler (PgBouncer) the session that would
    listen is a server connection lent to others between statements, so the loop does
    not listen there (it would leave ``LISTEN`` on a shared connection and hear
    nothing). A pooler gives itself away by the backend pid it reports at connect
    (its own cancel key), which is not the server's ``pg_backend_pid()``."""

    def __init__(self) -> None:
        self.connection: Any = None
        self.driver: psycopg.Connection[Any] | None = None
        self.failed_at = 0.0
        self.pooled = False
        self.poll: select.poll | None = None

    @classmethod
    def open(cls) -> Listener:
        listener = cls()
        listener.connect()
        return listener

    def ready(self) -> bool:
        """Whether it listens (a lost one is opened again after ``LISTEN_RETRY``)."""
        if (self.driver is None and not self.pooled
                and time.monotonic() - self.failed_at >= LISTEN_RETRY):
            self.connect()
        return self.driver is not None

    def connect(self) -> None:
        try:
            self.connection = get_engine().raw_connection()
            self.driver = cast("psycopg.Connection[Any]", self.connection.driver_connection)
            self.driver.autocommit = True
            row = self.driver.execute("SELECT pg_backend_pid()").fetchone()
            if row is None or row[0] != self.driver.info.backend_pid:
                self.pooled = True
                log.info("flush loop: Postgres is reached through a pooler; no LISTEN on"
                         " %s, looking every flush_loop_poll", FLUSH_CHANNEL)
                self.close()
                return
            self.driver.execute(f"LISTEN {FLUSH_CHANNEL}")
            self.poll = select.poll()  # not select(): a worker may hold 1024 files
            self.poll.register(self.driver.fileno(), select.POLLIN)
        except Exception as exc:
            self._lost(exc)

    def wait(self, seconds: float) -> bool:
        """Whether a notification came within ``seconds`` (all that came are taken).

        ``poll`` on the socket, then psycopg reads what came: its own
        ``notifies(timeout=…)`` costs about a millisecond of CPU per call, which a loop
        sleeping a millisecond at a time between windows (a burst falling due) cannot
        afford; ``poll`` costs microseconds."""
        if self.driver is None or self.poll is None:
            time.sleep(seconds)
            return False
        if not self.poll.poll(max(seconds, 0.0) * 1000):
            return False
        return self.drain() > 0

    def drain(self) -> int:
        """Take the notifications already here (the chunk about to run sees their
        cause); how many there were. A connection that ended is seen here too."""
        if self.driver is None:
            return 0
        try:
            return sum(1 for _ in self.driver.notifies(timeout=0))
        except psycopg.Error as exc:
            self._lost(exc)
            return 0

    def _lost(self, exc: BaseException) -> None:
        log.warning("flush loop: no LISTEN on %s (%s); looking every flush_loop_poll,"
                    " trying again in %.0f s", FLUSH_CHANNEL, describe_exception(exc),
                    LISTEN_RETRY)
        self.close()
        self.failed_at = time.monotonic()

    def close(self) -> None:
        connection, self.connection, self.driver = self.connection, None, None
        self.poll = None
        if connection is not None:
            try:
                connection.invalidate()  # never back to a pool with a LISTEN on it
            except Exception:
                log.debug("closing the LISTEN connection failed", exc_info=True)


#: The loop process's command line after the interpreter: a fresh interpreter that
#: imports this module (``-m`` would load it twice, as ``__main__`` and by name).
_ENTRY = "import sys; from notifier.worker.flush_loop import main; main(sys.argv[1:])"


def main(argv: list[str]) -> None:
    """The loop process: ``<worker pid> <log level> [<log file>]``."""
    from notifier.logs import configure

    parent_pid, level, logfile = int(argv[0]), argv[1], (argv[2] if len(argv) > 2 else "")
    multiprocessing.current_process().name = "FlushLoop"  # as log lines name the process
    settings = get_settings()
    configure(level, logfile or None, settings.log_format == "json",
              settings.log_max_line_bytes)
    try:
        FlushLoop(settings, parent_pid).run()
    finally:
        metrics.process_exited(os.getpid())


# --- the worker's side: start, keep alive, stop ----------------------------------------


class FlushLoopSupervisor:
    """Starts the worker's loop process, starts it again if it dies, stops it (SIGTERM,
    then SIGKILL after ``STOP_TIMEOUT``) when the worker stops.

    The loop shares the worker's process group, environment, working directory and
    output; it inherits none of its connections."""

    def __init__(self, loglevel: str | int, logfile: str | None) -> None:
        self.level = loglevel if isinstance(loglevel, str) else logging.getLevelName(loglevel)
        self.logfile = logfile or ""
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, str(os.getpid()), self.level, self.logfile],
            stdin=subprocess.DEVNULL,
        )

    def check(self) -> None:
        """Called now and then in the worker: a loop that died is started again."""
        if self.stopped or self.process is None or self.process.poll() is None:
            return
        log.warning("flush loop exited (%s); starting it again", self.process.returncode)
        self.start()

    def stop(self) -> None:
        self.stopped = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("flush loop did not stop in %.0f s; killing it", STOP_TIMEOUT)
            process.kill()
            process.wait()


def runs_flush_loop(settings: Settings, consumed: list[str]) -> bool:
    """A worker runs a loop if the loop is on and it consumes beat's queue (where the
    flush ran before: deployments keep flushing on the same workers)."""
    return settings.flush_loop and BEAT_QUEUE in consumed


class FlushLoopStep(bootsteps.StartStopStep):
    """The worker bootstep of the flush loop (added to the app in ``app.py``)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.supervisor: FlushLoopSupervisor | None = None

    def include_if(self, worker: Any) -> bool:
        consumed = [queue.name for queue in worker.app.amqp.queues.consume_from.values()]
        return runs_flush_loop(get_settings(), consumed)

    def create(self, worker: Any) -> FlushLoopSupervisor:
        self.supervisor = FlushLoopSupervisor(worker.loglevel, getattr(worker, "logfile", None))
        return self.supervisor

    def start(self, worker: Any) -> None:
        super().start(worker)
        if self.supervisor is not None and worker.timer is not None:
            worker.timer.call_repeatedly(SUPERVISE_INTERVAL, self.supervisor.check)
