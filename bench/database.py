"""The benchmark's view of Postgres: reset, seed, count, time and latency queries.

Its own autocommit psycopg connection, so polling never holds a transaction open (a
TRUNCATE would wait for it) and every count sees only committed rows.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

#: Every table a scenario fills: windows and digests too, or a run would add to the
#: windows the last one left open (their notifications gone) and close them early; and
#: the suppression list, or the hard bounces of one run's ``receipts`` step kept the next
#: run's e-mails to those addresses from being sent (58 of 2,000: ``email_pooled`` timed
#: out waiting for them).
TABLES = ("notifications, deliveries, idempotency_keys, dead_letters, recipients,"
          " aggregation_windows, digests, suppressions, soft_bounces, callbacks")


def connect(libpq_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url, autocommit=True)


def reset(conn: psycopg.Connection[Any], recipients: int) -> None:
    """Empty the tables and create the recipients every scenario sends to.

    Recipients exist beforehand, as they would in production, so that the naive task
    can be a single INSERT; the pipeline still runs its own recipient upsert.
    """
    conn.execute(f"TRUNCATE {TABLES} CASCADE")
    conn.execute(
        "INSERT INTO recipients (id) SELECT 'user-' || g FROM generate_series(0, %s) g",
        (recipients - 1,),
    )
    conn.execute("VACUUM ANALYZE recipients")


def count_rows(conn: psycopg.Connection[Any], priority: str | None = None) -> int:
    if priority is None:
        row = conn.execute("SELECT count(*) FROM notifications").fetchone()
    else:
        row = conn.execute(
            "SELECT count(*) FROM notifications WHERE priority = %s", (priority,)
        ).fetchone()
    return int(row[0]) if row else 0


def wait_for_rows(
    conn: psycopg.Connection[Any], expected: int, timeout: float, interval: float,
    priority: str | None = None, samples: list[tuple[float, int]] | None = None,
) -> tuple[float, int]:
    """Poll until ``expected`` rows are committed; returns (perf_counter time, rows seen).

    On timeout the rows seen so far are returned, and the caller reports a shortfall.
    Each reading is appended to ``samples`` (perf_counter time, rows), if given.
    """
    deadline = time.perf_counter() + timeout
    while True:
        seen = count_rows(conn, priority)
        now = time.perf_counter()
        if samples is not None:
            samples.append((now, seen))
        if seen >= expected or now > deadline:
            return now, seen
        time.sleep(interval)


def latency_ms(conn: psycopg.Connection[Any], priority: str) -> dict[str, float]:
    """Enqueue-to-commit latency of the rows of one priority, computed by Postgres.

    ``created_at`` is ``clock_timestamp()`` at insert and ``enqueued_at`` the producer's
    ``time.time()`` at publish; both clocks are this machine's (see clock_offset_ms).
    """
    row = conn.execute(
        """
        SELECT count(*),
               percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
               percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
               max(ms)
        FROM (SELECT extract(epoch FROM created_at - enqueued_at) * 1000 AS ms
              FROM notifications WHERE priority = %s AND enqueued_at IS NOT NULL) AS l
        """,
        (priority,),
    ).fetchone()
    assert row is not None
    count, p50, p99, worst = row
    return {"count": int(count), "p50": float(p50 or 0), "p99": float(p99 or 0),
            "max": float(worst or 0)}


def latencies_ms(conn: psycopg.Connection[Any], priority: str) -> list[float]:
    """Every enqueue-to-commit latency of one priority, in ms, smallest first (for the
    latency distribution plot; ``latency_ms`` gives the percentiles)."""
    rows = conn.execute(
        "SELECT extract(epoch FROM created_at - enqueued_at) * 1000 FROM notifications"
        " WHERE priority = %s AND enqueued_at IS NOT NULL ORDER BY 1",
        (priority,),
    ).fetchall()
    return [round(float(row[0]), 3) for row in rows]


def committed_after(conn: psycopg.Connection[Any], priority: str, other: str) -> int:
    """Rows of ``priority`` written after the last row of ``other`` (same clock)."""
    row = conn.execute(
        "SELECT count(*) FROM notifications WHERE priority = %s AND created_at >"
        " (SELECT max(created_at) FROM notifications WHERE priority = %s)",
        (priority, other),
    ).fetchone()
    return int(row[0]) if row else 0


def clock_offset_ms(conn: psycopg.Connection[Any]) -> float:
    """Postgres clock minus ours, in ms, from the midpoint of a round trip."""
    before = time.time()
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
    after = time.time()
    assert row is not None
    return (float(row[0]) - (before + after) / 2) * 1000


def server_version(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
