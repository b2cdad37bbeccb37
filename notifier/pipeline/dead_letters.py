"""Replaying and purging dead letters, the operator's way out of a failure.

A replayed delivery starts over (attempts reset) through the same outbox as any other
delivery, so it is claimed, rate-limited and recorded like the rest. A replayed ingest
rejection is handed to ``notifier.ingest`` again: useful once the cause is fixed (a
channel now configured, a schema migrated). Both are marked ``replayed_at`` so a second
replay of "everything not yet replayed" does not send them twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from notifier.ops.queries import DeadLetterFilter
from notifier.pipeline.outbox import DeliveryTask, queue_deliveries
from notifier.settings import Settings
from notifier.storage.models import DeadLetter, Stage


@dataclass
class Replay:
    replayed: int = 0
    #: Dead letters whose delivery is no longer dead (sent or replayed since): skipped.
    skipped: int = 0
    #: Dead letters whose delivery row retention has deleted: skipped, nothing to send.
    purged: int = 0
    #: Delivery tasks to publish after the commit.
    tasks: list[DeliveryTask] = field(default_factory=list)
    #: Ingest payloads to hand to ``notifier.ingest`` after the commit.
    ingest_payloads: list[Any] = field(default_factory=list)
    #: One line per dead letter that cannot be replayed (its payload was truncated);
    #: these stay unreplayed.
    refused: list[str] = field(default_factory=list)


def replayable_ids(
    session: Session, where: DeadLetterFilter, chunk: int = 500
) -> Iterator[list[int]]:
    """Ids of matching dead letters not yet replayed, oldest first, in chunks."""
    query = (
        select(DeadLetter.id)
        .where(*where.conditions(), DeadLetter.replayed_at.is_(None))
        .order_by(DeadLetter.id)
    )
    ids = list(session.scalars(query))
    for start in range(0, len(ids), chunk):
        yield ids[start:start + chunk]


def replay_dead_letters(session: Session, ids: list[int], settings: Settings) -> Replay:
    """Reset what the dead letters describe and mark them replayed, in one transaction."""
    rows = list(session.execute(
        select(DeadLetter.id, DeadLetter.stage, DeadLetter.delivery_id, DeadLetter.payload,
               DeadLetter.payload_truncated, DeadLetter.payload_bytes)
        .where(DeadLetter.id.in_(ids), DeadLetter.replayed_at.is_(None))
        .with_for_update(skip_locked=True)
    ))
    replay = Replay()
    truncated = [row for row in rows if row.stage != Stage.DELIVER and row.payload_truncated]
    replay.refused = [
        f"dead letter {row.id}: not replayed: only a prefix of its {row.payload_bytes}-byte"
        " payload was kept" for row in truncated
    ]
    rows = [row for row in rows if not (row.stage != Stage.DELIVER and row.payload_truncated)]
    delivery_ids = [row.delivery_id for row in rows if row.stage == Stage.DELIVER]
    revived = _revive_deliveries(session, delivery_ids)
    cursor = session.connection().connection.driver_connection.cursor()
    replay.tasks = queue_deliveries(cursor, revived, settings)
    existing = _existing_deliveries(session, delivery_ids)
    for row in rows:
        if row.stage == Stage.DELIVER:
            if row.delivery_id in revived:
                replay.replayed += 1
            elif row.delivery_id in existing:
                replay.skipped += 1
            else:
                replay.purged += 1
        else:
            replay.ingest_payloads.append(row.payload)
            replay.replayed += 1
    session.execute(
        update(DeadLetter).where(DeadLetter.id.in_([row.id for row in rows]))
        .values(replayed_at=func.now())
    )
    return replay


def _existing_deliveries(session: Session, delivery_ids: list[Any]) -> set[Any]:
    """Which of the deliveries still have a row (retention deletes old ones)."""
    if not delivery_ids:
        return set()
    return set(session.scalars(
        text("SELECT id FROM deliveries WHERE id = ANY(:ids)"), {"ids": delivery_ids}
    ))


def _revive_deliveries(session: Session, delivery_ids: list[Any]) -> list[Any]:
    """Dead deliveries back to the outbox with their attempts reset."""
    if not delivery_ids:
        return []
    revived = list(session.execute(
        text("""
        UPDATE deliveries SET status = 'pending', attempts = 0, last_error = NULL,
            next_attempt_at = now(), updated_at = now()
        WHERE id = ANY(:ids) AND status = 'dead'
        RETURNING id, notification_id
        """),
        {"ids": delivery_ids},
    ))
    notification_ids = [row.notification_id for row in revived if row.notification_id]
    if notification_ids:
        session.execute(
            text("UPDATE notifications SET status = 'dispatched', updated_at = clock_timestamp()"
                 " WHERE id = ANY(:ids) AND status = 'failed'"),
            {"ids": notification_ids},
        )
    return [row.id for row in revived]


def purge_dead_letters(session: Session, where: DeadLetterFilter) -> int:
    """Delete the matching dead letters; their deliveries stay recorded as dead."""
    result = session.execute(delete(DeadLetter).where(*where.conditions()))
    return result.rowcount

