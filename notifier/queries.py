"""Read-only questions operators ask of the pipeline (the CLI's status and listings)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from notifier.models import DeadLetter, Delivery, IdempotencyKey, Notification
from notifier.settings import PRIORITIES, queue_name


def notification_status(session: Session, notification_id: str) -> str | None:
    return session.scalar(select(Notification.status).where(Notification.id == notification_id))


def _count_by(session: Session, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column).order_by(column))
    return {key: count for key, count in rows}


def pipeline_status(session: Session) -> dict[str, Any]:
    """Counts by status and the age of the oldest notification still waiting."""
    oldest = session.scalar(
        select(func.extract("epoch", func.now() - func.min(Notification.created_at)))
        .where(Notification.status == "pending")
    )
    return {
        "notifications": _count_by(session, Notification.status),
        "deliveries": _count_by(session, Delivery.status),
        "dead_letters": _count_by(session, DeadLetter.stage),
        "duplicates_dropped": session.scalar(
            select(func.coalesce(func.sum(IdempotencyKey.duplicates), 0))
        ),
        "oldest_pending_age_seconds": None if oldest is None else float(oldest),
    }


def queue_depths() -> dict[str, int | None]:
    """Messages waiting in each priority queue (None where the broker cannot tell)."""
    from notifier.celery_app import app

    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        for priority in PRIORITIES:
            name = queue_name(priority)
            if hasattr(channel, "_size"):  # kombu's virtual transports (Redis)
                depths[name] = channel._size(name)
                continue
            try:
                depths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except Exception:  # an AMQP queue nobody declared yet
                depths[name] = None
                channel = connection.channel()
    return depths


@dataclass(frozen=True)
class DeadLetterFilter:
    stage: str | None = None
    type: str | None = None
    channel: str | None = None
    since: datetime | None = None


def find_dead_letters(
    session: Session, where: DeadLetterFilter, limit: int = 50
) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.created_at.desc(), DeadLetter.id.desc())
    if where.stage:
        query = query.where(DeadLetter.stage == where.stage)
    if where.type:
        query = query.where(DeadLetter.type == where.type)
    if where.channel:
        query = query.where(DeadLetter.channel == where.channel)
    if where.since:
        query = query.where(DeadLetter.created_at >= where.since)
    return list(session.scalars(query.limit(limit)))
