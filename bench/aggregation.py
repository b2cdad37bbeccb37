"""Aggregation figures: how many messages digests save, and how fast they are flushed.

* ``aggregation_efficiency`` replays a realistic day part (several hours of mixed types,
  bursts and a few critical ones, for a few hundred recipients) through the real
  ingest and flush functions on a simulated clock, and counts notifications in against
  messages out (delivery rows). The naive baseline sends one message per notification.
* ``flush_latency`` leaves 100,000 notifications waiting in windows that close over
  about half a minute, then runs a real worker (whose flush loop flushes each window
  as it falls due) and a real beat (whose tick, every second, keeps the loop armed) and
  measures, per digest, the time from its window's close to its delivery being queued.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import cpu
from bench.config import RESULTS_DIR, BenchConfig
from bench.scenarios import Bench, Outcome
from bench.series import summary
from bench.workers import WorkerSpec, running_worker
from notifier.pipeline.flush import flush_due_windows
from notifier.pipeline.ingest import IngestMessage, ingest_batch
from notifier.pipeline.rules import BUILTIN_RULES
from notifier.settings import get_settings
from notifier.storage.db import raw_cursor, session_scope
from notifier.worker.batch_sizing import delivery_sizer

#: Tables the aggregation scenarios empty first.
TABLES = ("notifications, deliveries, digests, aggregation_windows, idempotency_keys,"
          " dead_letters, recipients, inbox_messages")
SEED = 20261123


@dataclass(frozen=True)
class TypeLoad:
    """How often one type reaches a recipient: bursts per hour and items per burst."""

    type: str
    bursts_per_hour: float
    burst_sizes: tuple[int, ...]
    critical_share: float = 0.0


#: The mix of the product brief's types (and one type without a rule of its own):
#: alerts and system updates come in bursts (a failing deploy, a release), approvals and
#: reminders mostly one at a time, announcements rarely.
MIX = (
    TypeLoad("system_update", 0.6, (1, 2, 3, 5)),
    TypeLoad("approval_request", 1.5, (1, 1, 2)),
    TypeLoad("alert", 0.5, (1, 2, 4, 6), critical_share=0.1),
    TypeLoad("reminder", 1.0, (1, 1, 1, 2)),
    TypeLoad("announcement", 0.05, (1,)),
    TypeLoad("task_deadline", 0.5, (1, 2, 3)),
    TypeLoad("comment.reply", 1.0, (1, 1, 2, 3)),
)


def reset(bench: Bench) -> None:
    bench.conn.execute(f"TRUNCATE {TABLES} CASCADE")


def simulated_arrivals(
    recipients: int, hours: float, start: datetime, rng: random.Random
) -> list[tuple[datetime, dict[str, Any]]]:
    """(arrival time, notification) for every burst of every type of every recipient."""
    arrivals = []
    span = hours * 3600
    for r in range(recipients):
        for load in MIX:
            bursts = _poisson(rng, load.bursts_per_hour * hours)
            for _ in range(bursts):
                at = start + timedelta(seconds=rng.uniform(0, span))
                for k in range(rng.choice(load.burst_sizes)):
                    critical = rng.random() < load.critical_share
                    arrivals.append((at + timedelta(seconds=k * rng.uniform(1, 20)), {
                        "id": str(uuid.uuid4()), "recipient": f"person-{r}",
                        "type": load.type, "priority": "critical" if critical else "normal",
                        "title": f"{load.type} #{len(arrivals)}", "data": {"k": k},
                    }))
    arrivals.sort(key=lambda pair: pair[0])
    return arrivals


def _poisson(rng: random.Random, mean: float) -> int:
    count, total = 0, rng.expovariate(1.0)
    while total < mean:
        count += 1
        total += rng.expovariate(1.0)
    return count


def aggregation_efficiency(bench: Bench, recipients: int = 300, hours: float = 6.0) -> Outcome:
    """Notifications in against messages out, on a simulated clock (10 s ticks)."""
    reset(bench)
    rng = random.Random(SEED)
    start = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    arrivals = simulated_arrivals(recipients, hours, start, rng)
    settings = get_settings()
    tick = timedelta(seconds=10)
    began = time.perf_counter()
    index, now = 0, start
    end = start + timedelta(hours=hours)
    while index < len(arrivals) or now <= end:
        now += tick
        batch = []
        while index < len(arrivals) and arrivals[index][0] <= now:
            batch.append(arrivals[index][1])
            index += 1
        with session_scope() as session:
            if batch:
                ingest_batch(session, [IngestMessage(str(uuid.uuid4()), batch)], settings,
                             rules=BUILTIN_RULES, now=now)
            _flush_all(session, settings, now)
    with session_scope() as session:  # what still waits goes out when its window closes
        _flush_all(session, settings, end + timedelta(days=2))
    seconds = time.perf_counter() - began
    messages = _scalar(bench, "SELECT count(*) FROM deliveries")
    digests = _scalar(bench, "SELECT count(*) FROM deliveries WHERE digest_id IS NOT NULL")
    per_type = {
        row[0]: {"in": row[1], "out": row[2]}
        for row in bench.conn.execute(
            """
            SELECT n.type, count(*),
                   count(DISTINCT coalesce(n.digest_id::text, n.id::text))
            FROM notifications n GROUP BY n.type ORDER BY n.type
            """
        ).fetchall()
    }
    statuses = Counter(dict(bench.conn.execute(
        "SELECT status, count(*) FROM notifications GROUP BY status").fetchall()))
    count = len(arrivals)
    return Outcome(
        "aggregation_efficiency",
        f"{count:,} notifications, {recipients} recipients, {hours:g} h simulated",
        count, seconds, seconds, count,
        extra={"messages_out": messages, "digest_messages": digests,
               "naive_messages_out": count,
               "messages_saved": round(1 - messages / count, 3) if count else 0.0,
               "notifications_per_message": round(count / messages, 2) if messages else 0.0,
               "per_type": per_type, "statuses": dict(statuses)},
    )


def _flush_all(session: Any, settings: Any, now: datetime) -> None:
    cursor = raw_cursor(session)
    sizer = delivery_sizer(settings)  # as beat's flush task sizes its delivery tasks
    while flush_due_windows(cursor, BUILTIN_RULES, settings, now, batch_size=sizer).windows:
        pass


def _scalar(bench: Bench, sql: str) -> int:
    row = bench.conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


# --- flush latency -------------------------------------------------------------------

#: Beat's tick goes to the critical delivery queue, and a worker consuming it runs the
#: flush loop (notifier.worker.flush_loop).
FLUSH_WORKER = WorkerSpec("bench-flush", "notifier", ("notifier.deliver.critical",))


def fill_windows(waiting: int, per_window: int, spread: float) -> datetime:
    """``waiting`` notifications in windows of ``per_window`` items (below the rule's
    maximum, so only time closes them), opened ``spread`` seconds apart in all; returns
    the clock of the first window's close."""
    rule = BUILTIN_RULES.for_type("reminder")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    settings = get_settings()
    windows = waiting // per_window
    chunk = max(1, 500 // per_window)  # recipients per ingest transaction
    for first in range(0, windows, chunk):
        batch = [
            {"recipient": f"waiting-{r}", "type": "reminder", "title": f"Item {k} of {r}",
             "data": {"k": k}}
            for r in range(first, min(windows, first + chunk)) for k in range(per_window)
        ]
        opened = base + timedelta(seconds=spread * first / windows)
        with session_scope() as session:
            ingest_batch(session, [IngestMessage(str(uuid.uuid4()), batch)], settings,
                         rules=BUILTIN_RULES, now=opened)
    return base + rule.window


def shift_windows(bench: Bench, lead: float) -> datetime:
    """Move every window by the same amount so the first closes ``lead`` seconds from
    now: the windows keep their spacing, only the clock they were filled on changes.
    Returns the new close of the first window (Postgres's clock)."""
    bench.conn.execute(
        """
        UPDATE aggregation_windows SET opened_at = opened_at + d, due_at = due_at + d,
            latest_due_at = latest_due_at + d
        FROM (SELECT (clock_timestamp() + make_interval(secs => %s))
                     - (SELECT min(due_at) FROM aggregation_windows) AS d) AS shift
        """,
        (lead,),
    )
    row = bench.conn.execute("SELECT min(due_at) FROM aggregation_windows").fetchone()
    assert row is not None
    return row[0]


class Beat:
    """A real ``celery beat`` (its flush tick every ``NOTIFIER_FLUSH_INTERVAL``), for the block."""

    LOG = RESULTS_DIR / "bench-beat.log"

    def __init__(self, config: BenchConfig):
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        self.log = self.LOG.open("w")
        env = config.worker_environment()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "notifier", "beat", "-l", "info",
             "-s", str(RESULTS_DIR / "bench-beat-schedule")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> Beat:
        return self

    def wait_ticking(self, timeout: float = 60.0) -> None:
        """Block until beat has sent its first flush: it is up and on its schedule."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery beat exited; see {self.LOG}")
            if "flush-aggregation-windows" in self.LOG.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"celery beat sent no flush in {timeout:g} s; see {self.LOG}")

    def __exit__(self, *exc_info: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


#: Seconds from the move of the windows to the close of the first one.
LEAD = 2.0


def flush_latency(bench: Bench, waiting: int = 100_000, per_window: int = 5,
                  spread: float = 30.0) -> Outcome:
    """Window close → delivery queued, per digest, with ``waiting`` notifications waiting.

    The windows are parked an hour ahead while the worker and beat start; once beat has
    sent its first flush they are moved so that the first closes ``LEAD`` seconds later,
    and the clock starts at that close. ``series``: windows flushed over time.
    """
    reset(bench)
    fill_started = time.perf_counter()
    fill_windows(waiting, per_window, spread)
    fill_seconds = time.perf_counter() - fill_started
    windows = _scalar(bench, "SELECT count(*) FROM aggregation_windows")
    bench.conn.execute("VACUUM ANALYZE aggregation_windows, notifications")
    timeout = spread + 120
    samples: list[tuple[float, int]] = []
    with running_worker(FLUSH_WORKER, bench.config) as worker:
        shift_windows(bench, lead=3600.0)
        with Beat(bench.config) as beat:
            beat.wait_ticking()
            before = cpu.snapshot(worker.pid)
            shift_windows(bench, lead=LEAD)
            began = time.perf_counter() + LEAD  # the first window's close
            deadline = time.monotonic() + LEAD + timeout
            while time.monotonic() < deadline:
                left = _scalar(bench, "SELECT count(*) FROM aggregation_windows")
                samples.append((time.perf_counter(), windows - left))
                if left == 0:
                    break
                time.sleep(bench.config.sample_interval)
            seconds = time.perf_counter() - began
            cores = cpu.cores_used(before, cpu.snapshot(worker.pid), seconds + LEAD)
    lags = [round(float(row[0]), 3) for row in bench.conn.execute(
        """
        SELECT extract(epoch FROM d.queued_at - g.window_end) * 1000 AS lag
        FROM deliveries d JOIN digests g ON g.id = d.digest_id
        WHERE d.queued_at IS NOT NULL ORDER BY 1
        """
    ).fetchall()]
    digested = _scalar(bench, "SELECT count(*) FROM notifications WHERE status = 'digested'")
    settings = get_settings()
    return Outcome(
        "flush_latency", f"{waiting:,} waiting in {windows:,} windows closing over {spread:g} s",
        waiting, seconds, seconds, digested, cores,
        extra={"windows": windows, "digests_queued": len(lags), "per_window": per_window,
               "spread_seconds": spread, "fill_seconds": round(fill_seconds, 2),
               "windows_left": windows - (samples[-1][1] if samples else 0),
               "flush_interval_s": settings.flush_interval,
               "flush_batch_size": settings.flush_batch_size,
               "flush_latency_ms": summary(lags)},
        series=[(round(t - began, 3), n) for t, n in samples],
        samples={"flush": lags},
    )
