"""How far behind the pipeline is: the oldest waiting work of each kind, in one query
shared by ``notifier status``, the metrics and the health check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from notifier.storage.models import UNSENT_DELIVERY_STATUSES, sql_list


@dataclass(frozen=True)
class PipelineLag:
    """How long the oldest waiting work of each kind has waited, in seconds (None: none).

    One answer for ``notifier status``, the metrics and the health check.
    """

    #: The oldest notification still ``pending``: in its aggregation window, or in none.
    oldest_pending: float | None
    #: The most overdue delivery: unsent, its next attempt due; its channel and status.
    delivery_overdue: float | None
    delivery_channel: str | None
    delivery_status: str | None
    #: The aggregation window longest past its due time, not flushed yet.
    window_overdue: float | None


# Each an index lookup: the pending notifications' partial index, the partial index of
# due work (its WHERE matches this text), the windows by due time.
_LAG_SQL = f"""
SELECT
    (SELECT extract(epoch FROM now() - min(created_at)) FROM notifications
     WHERE status = 'pending'),
    extract(epoch FROM now() - d.next_attempt_at), d.channel, d.status,
    extract(epoch FROM now() - w.due_at)
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT next_attempt_at, channel, status FROM deliveries
    WHERE status IN ({sql_list(UNSENT_DELIVERY_STATUSES)})
    ORDER BY next_attempt_at LIMIT 1
) AS d ON d.next_attempt_at <= now()
LEFT JOIN LATERAL (
    SELECT due_at FROM aggregation_windows ORDER BY due_at LIMIT 1
) AS w ON w.due_at <= now()
"""


def pipeline_lag(database: Session | Connection) -> PipelineLag:
    """The oldest waiting work, read in the caller's transaction (its ``now()``)."""
    row = database.execute(text(_LAG_SQL)).one()
    return PipelineLag(
        oldest_pending=_seconds(row[0]), delivery_overdue=_seconds(row[1]),
        delivery_channel=row[2], delivery_status=row[3], window_overdue=_seconds(row[4]),
    )


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)
