"""Read-only questions operators ask of the pipeline (the CLI's status and listings)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from notifier.pipeline.lag import pipeline_lag
from notifier.storage.models import (
    DeadLetter,
    Delivery,
    IdempotencyKey,
    Notification,
)


def notification_status(session: Session, notification_id: str) -> str | None:
    return session.scalar(select(Notification.status).where(Notification.id == notification_id))


def _count_by(session: Session, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column).order_by(column))
    return {key: count for key, count in rows}


def pipeline_status(session: Session) -> dict[str, Any]:
    """Counts by status and the age of the oldest notification still waiting."""
    return {
        "notifications": _count_by(session, Notification.status),
        "deliveries": _count_by(session, Delivery.status),
        "dead_letters": _count_by(session, DeadLetter.stage),
        "duplicates_dropped": session.scalar(
            select(func.coalesce(func.sum(IdempotencyKey.duplicates), 0))
        ),
        "oldest_pending_age_seconds": pipeline_lag(session).oldest_pending,
    }
