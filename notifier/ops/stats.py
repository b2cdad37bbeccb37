"""Pipeline figures over a time window, from Postgres alone (``notifier stats``).

The window is ``[since, until)``. Each figure family is one SQL statement:

* **Ingest** — notifications stored in the window (``created_at``), by priority; of
  them, suppressed by preferences; notifications rejected at ingest (dead letters of
  stage ``ingest``); ingest latency, producer's enqueue → row committed, for the
  notifications whose producer stamped the enqueue time (the client does).
* **Deliveries** — by channel, by priority and in all (and sent ones by the channel's
  provider that sent them, ``deliveries.provider``): sent in the window
  (``sent_at``), of them after at least one failed attempt; dead in the window; and
  *retrying*: unsent deliveries with a failed attempt, last touched in the window.
  Delivered % and error % split those three: sent / all, (retrying + dead) / all.
  Latency: delivery row created → sent, for deliveries sent in the window (for a digest
  its row is created when its window is flushed, so waiting in a window is not in it).
  The same statement counts what the sent messages carried: a digest's delivery is one
  message for all its members, so *batching* is notifications carried per message.

Throughput is a count divided by the window's length. Percentiles are interpolated
(``percentile_cont``), in seconds.

**Tables** — each table's size now, whatever the window: rows as Postgres estimates
them (``pg_class.reltuples``, kept by autovacuum/ANALYZE; None before the first one)
and bytes with indexes and TOAST (``pg_total_relation_size``). Both are catalogue reads,
cheap on any size, unlike ``count(*)``; they show whether retention keeps up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from notifier.settings import PRIORITIES
from notifier.storage.models import (
    SENT_DELIVERY_STATUSES,
    UNFINISHED_DELIVERY_STATUSES,
    sql_list,
)

QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class Percentiles:
    """Latency in seconds over ``count`` samples (None when there were none)."""

    count: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def from_row(cls, count: int, values: list[float] | None) -> Percentiles:
        if not count or not values:
            return cls(count)
        return cls(count, *(float(v) for v in values))


@dataclass(frozen=True)
class IngestFigures:
    total: int
    by_priority: dict[str, int]
    per_second: float
    #: Stored as ``suppressed`` (opted out, below the recipient's minimum priority).
    suppressed: int
    #: Refused at ingest (dead letters of stage ``ingest`` written in the window).
    rejected: int
    #: Producer's enqueue → row committed.
    latency: Percentiles


@dataclass(frozen=True)
class DeliveryFigures:
    sent: int = 0
    #: Sent after at least one failed attempt.
    sent_after_retry: int = 0
    #: Not sent yet, with at least one failed attempt, last touched in the window.
    retrying: int = 0
    dead: int = 0
    per_second: float = 0.0
    latency: Percentiles = field(default_factory=lambda: Percentiles(0))
    #: Sent messages that were digests, and the notifications the sent messages carried.
    digests: int = 0
    notifications: int = 0

    @property
    def outcomes(self) -> int:
        return self.sent + self.retrying + self.dead

    @property
    def delivered_rate(self) -> float | None:
        return self.sent / self.outcomes if self.outcomes else None

    @property
    def error_rate(self) -> float | None:
        return (self.retrying + self.dead) / self.outcomes if self.outcomes else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delivered_rate": self.delivered_rate,
                "error_rate": self.error_rate}


@dataclass(frozen=True)
class Batching:
    """Notifications carried per message sent (digests count once for their members)."""

    messages: int
    notifications: int
    digests: int
    #: Members of the sent digests.
    digest_members: int

    @property
    def per_message(self) -> float | None:
        return self.notifications / self.messages if self.messages else None

    @property
    def digest_size(self) -> float | None:
        return self.digest_members / self.digests if self.digests else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_message": self.per_message,
                "mean_digest_size": self.digest_size}


#: The tables ``notifier stats`` sizes, in the order it prints them.
TABLES = ("notifications", "deliveries", "digests", "aggregation_windows", "inbox_messages",
          "dead_letters", "idempotency_keys", "recipients")


@dataclass(frozen=True)
class TableSize:
    #: Postgres's estimate; None when the table was never vacuumed or analysed.
    rows: int | None
    #: Heap, indexes and TOAST.
    bytes: int


@dataclass(frozen=True)
class Stats:
    since: datetime
    until: datetime
    ingest: IngestFigures
    deliveries: DeliveryFigures
    by_channel: dict[str, DeliveryFigures]
    by_priority: dict[str, DeliveryFigures]
    batching: Batching
    tables: dict[str, TableSize] = field(default_factory=dict)
    #: Sent deliveries by ``<channel> <provider>`` (``email 1:smtp.backup.example``):
    #: which of a channel's providers sent how much (only sent rows name a provider).
    by_provider: dict[str, DeliveryFigures] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.until - self.since).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(), "until": self.until.isoformat(),
            "seconds": self.seconds,
            "ingest": asdict(self.ingest),
            "deliveries": self.deliveries.as_dict(),
            "by_channel": {name: f.as_dict() for name, f in self.by_channel.items()},
            "by_priority": {name: f.as_dict() for name, f in self.by_priority.items()},
            "by_provider": {name: f.as_dict() for name, f in self.by_provider.items()},
            "batching": self.batching.as_dict(),
            "tables": {name: asdict(size) for name, size in self.tables.items()},
        }


def collect_stats(
    session: Session, window: timedelta, until: datetime | None = None
) -> Stats:
    """The figures of the ``window`` before ``until`` (default: the database's now)."""
    if until is None:
        until = session.execute(text("SELECT now()")).scalar_one()
    since = until - window
    seconds = window.total_seconds()
    ingest = ingest_figures(session, since, until, seconds)
    total, by_channel, by_priority, by_provider = delivery_figures(
        session, since, until, seconds)
    batching = Batching(
        messages=total.sent, notifications=total.notifications, digests=total.digests,
        digest_members=total.notifications - (total.sent - total.digests),
    )
    return Stats(since, until, ingest, total, by_channel, by_priority, batching,
                 table_sizes(session), by_provider)


_TABLE_SIZES_SQL = """
SELECT c.relname AS name, c.reltuples AS rows, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c
WHERE c.relkind IN ('r', 'p') AND c.relnamespace = CAST(current_schema() AS regnamespace)
  AND c.relname = ANY(:tables)
"""


def table_sizes(session: Session) -> dict[str, TableSize]:
    """Estimated rows and total bytes of each of our tables, from the catalogue."""
    rows = session.execute(text(_TABLE_SIZES_SQL), {"tables": list(TABLES)}).all()
    found = {
        row.name: TableSize(rows=int(row.rows) if row.rows >= 0 else None, bytes=row.bytes)
        for row in rows
    }
    return {name: found[name] for name in TABLES if name in found}


_INGEST_SQL = """
SELECT grouping(priority) = 1 AS everything, priority,
       count(*) AS ingested,
       count(*) FILTER (WHERE status = 'suppressed') AS suppressed,
       count(enqueued_at) AS timed,
       percentile_cont(CAST(:quantiles AS float8[])) WITHIN GROUP (
           ORDER BY extract(epoch FROM created_at - enqueued_at)
       ) FILTER (WHERE enqueued_at IS NOT NULL) AS latency,
       (SELECT count(*) FROM dead_letters
        WHERE stage = 'ingest' AND created_at >= :since AND created_at < :until) AS rejected
FROM notifications
WHERE created_at >= :since AND created_at < :until
GROUP BY GROUPING SETS ((priority), ())
"""


def ingest_figures(
    session: Session, since: datetime, until: datetime, seconds: float
) -> IngestFigures:
    rows = session.execute(text(_INGEST_SQL), _params(since, until)).all()
    by_priority = {row.priority: row.ingested for row in rows if not row.everything}
    total = next(row for row in rows if row.everything)  # () gives a row even when empty
    return IngestFigures(
        total=total.ingested,
        by_priority={p: by_priority[p] for p in PRIORITIES if p in by_priority},
        per_second=total.ingested / seconds,
        suppressed=total.suppressed,
        rejected=total.rejected,
        latency=Percentiles.from_row(total.timed, total.latency),
    )


_UNFINISHED = sql_list(UNFINISHED_DELIVERY_STATUSES)
#: Sent, whatever the provider's receipts said after (a bounce was still sent by us).
_SENT = sql_list(SENT_DELIVERY_STATUSES)

# The three branches each match an index: terminal rows by status, the unsent ones by
# the partial index of due work (and ``sending``, a handful, by status).
_DELIVERY_SQL = f"""
WITH touched AS (
    SELECT channel, priority, status, attempts, created_at, sent_at, digest_id, provider
    FROM deliveries
    WHERE status IN ({_SENT}) AND sent_at >= :since AND sent_at < :until
      AND updated_at >= :since  -- implied (a row's updated_at never precedes sent_at)
  UNION ALL
    SELECT channel, priority, status, attempts, created_at, sent_at, digest_id, provider
    FROM deliveries
    WHERE status = 'dead' AND updated_at >= :since AND updated_at < :until
  UNION ALL
    SELECT channel, priority, status, attempts, created_at, sent_at, digest_id, provider
    FROM deliveries
    WHERE status IN ({_UNFINISHED})
      AND attempts > 0 AND updated_at >= :since AND updated_at < :until
)
SELECT grouping(t.channel) = 0 AS by_channel, grouping(t.priority) = 0 AS by_priority,
       grouping(t.provider) = 0 AS by_provider, t.channel, t.priority, t.provider,
       count(*) FILTER (WHERE t.status IN ({_SENT})) AS sent,
       count(*) FILTER (WHERE t.status IN ({_SENT}) AND t.attempts > 1) AS sent_after_retry,
       count(*) FILTER (WHERE t.status IN ({_UNFINISHED})) AS retrying,
       count(*) FILTER (WHERE t.status = 'dead') AS dead,
       percentile_cont(CAST(:quantiles AS float8[])) WITHIN GROUP (
           ORDER BY extract(epoch FROM t.sent_at - t.created_at)
       ) FILTER (WHERE t.status IN ({_SENT})) AS latency,
       count(*) FILTER (WHERE t.status IN ({_SENT}) AND t.digest_id IS NOT NULL) AS digests,
       coalesce(sum(coalesce(g.item_count, 1)) FILTER (WHERE t.status IN ({_SENT})), 0)
           AS notifications
FROM touched t
LEFT JOIN digests g ON g.id = t.digest_id
GROUP BY GROUPING SETS ((t.channel), (t.priority), (t.channel, t.provider), ())
"""


def delivery_figures(
    session: Session, since: datetime, until: datetime, seconds: float
) -> tuple[DeliveryFigures, dict[str, DeliveryFigures], dict[str, DeliveryFigures],
           dict[str, DeliveryFigures]]:
    """(in all, by channel, by priority, by channel and provider: sent rows only)."""
    total = DeliveryFigures()
    by_channel: dict[str, DeliveryFigures] = {}
    by_priority: dict[str, DeliveryFigures] = {}
    by_provider: dict[str, DeliveryFigures] = {}
    for row in session.execute(text(_DELIVERY_SQL), _params(since, until)):
        figures = DeliveryFigures(
            sent=row.sent, sent_after_retry=row.sent_after_retry, retrying=row.retrying,
            dead=row.dead, per_second=row.sent / seconds,
            latency=Percentiles.from_row(row.sent, row.latency),
            digests=row.digests, notifications=int(row.notifications),
        )
        if row.by_provider:
            if row.provider is not None:  # unsent rows name none
                by_provider[f"{row.channel} {row.provider}"] = figures
        elif row.by_channel:
            by_channel[row.channel] = figures
        elif row.by_priority:
            by_priority[row.priority] = figures
        else:
            total = figures
    return (
        total,
        dict(sorted(by_channel.items())),
        {p: by_priority[p] for p in PRIORITIES if p in by_priority},
        dict(sorted(by_provider.items())),
    )


def _params(since: datetime, until: datetime) -> dict[str, Any]:
    return {"since": since, "until": until, "quantiles": list(QUANTILES)}
