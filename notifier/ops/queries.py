"""Read-only questions operators ask of the pipeline (the CLI's status and listings)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from notifier.storage.models import DeadLetter, Delivery, IdempotencyKey, Notification


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


def queue_depths(names: list[str] | None = None) -> dict[str, int | None]:
    """Messages waiting in each of our queues, or in ``names`` (None where the broker
    cannot tell)."""
    from notifier.worker.app import app

    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        for name in names or [queue.name for queue in app.conf.task_queues]:
            if hasattr(channel, "_size"):  # kombu's virtual transports (Redis)
                depths[name] = channel._size(name)
                continue
            try:
                depths[name] = channel.queue_declare(queue=name, passive=True).message_count
            except Exception:  # an AMQP queue nobody declared yet
                depths[name] = None
                channel = connection.channel()
    return depths


def circuit_states() -> dict[str, dict[str, Any]]:
    """Each channel's circuit breaker as every worker sees it (state kept in Redis)."""
    from notifier.channels import CHANNEL_NAMES
    from notifier.pipeline.delivery import circuit_breaker
    from notifier.settings import get_settings
    from notifier.storage.state import state_redis

    settings = get_settings()
    return {
        name: circuit_breaker(state_redis(), name, settings).describe()
        for name in sorted(CHANNEL_NAMES)
    }
