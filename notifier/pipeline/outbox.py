"""The outbox: delivery rows waiting to be published as ``notifier.deliver`` tasks.

Delivery rows are written in the transaction that decided them (ingest, the flush);
the tasks that carry their ids are published only after it commits. A row whose task
was never published, or was lost by the broker, is found again by the sweeper.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from notifier.ids import uuid7
from notifier.settings import Settings, delivery_queue

if TYPE_CHECKING:
    from psycopg import Cursor

#: Deliveries per task: (queue, deliveries ready for it) -> how many go in one task. The
#: worker's follows the queue's backlog, read from the broker
#: (``notifier.worker.batch_sizing``); the pipeline never asks the broker itself.
BatchSize = Callable[[str, int], int]


@dataclass(frozen=True)
class NewDelivery:
    recipient_id: str
    channel: str
    priority: str
    notification_id: uuid.UUID | None = None
    digest_id: uuid.UUID | None = None
    #: Held until then (quiet hours, ``send_at``); None: due now.
    hold_until: datetime | None = None
    #: Its notification has a ``callback_url``: its finished statuses become callback
    #: events (``deliveries.callback``, ``notifier.pipeline.callbacks``).
    callback: bool = False


@dataclass(frozen=True)
class DeliveryTask:
    """One ``notifier.deliver`` task to publish: deliveries of one channel and queue."""

    channel: str
    queue: str
    delivery_ids: list[str]
    countdown: float = 0.0


def insert_deliveries(cursor: Cursor[Any], deliveries: Sequence[NewDelivery]) -> list[uuid.UUID]:
    """Write delivery rows; returns the ids due now (pending: the outbox to publish).
    Held ones are ``scheduled`` and the sweeper publishes them when their time comes."""
    if not deliveries:
        return []
    rows = [
        (uuid7(), d.notification_id, d.digest_id, d.recipient_id, d.channel, d.priority,
         "scheduled" if d.hold_until else "pending", d.hold_until)
        for d in deliveries
    ]
    columns = [list(column) for column in zip(*rows, strict=True)]
    # The ``callback`` column is sent only when a delivery needs it: the statement
    # (and its cost) of everyone else stays as it was.
    callback = any(d.callback for d in deliveries)
    if callback:
        columns.append([d.callback for d in deliveries])
    cursor.execute(
        f"""
        INSERT INTO deliveries (id, notification_id, digest_id, recipient_id, channel,
            priority, status, next_attempt_at, last_error{", callback" if callback else ""})
        SELECT d.id, d.n, d.g, d.r, d.c, d.p, d.s, coalesce(d.due, now()),
               CASE WHEN d.due IS NOT NULL THEN 'held until ' || d.due::text END
               {", d.cb" if callback else ""}
        FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[],
                    %s::text[], %s::timestamptz[]{", %s::bool[]" if callback else ""})
             AS d(id, n, g, r, c, p, s, due{", cb" if callback else ""})
        ON CONFLICT DO NOTHING
        RETURNING id, status
        """,
        columns,
    )
    return [row[0] for row in cursor.fetchall() if row[1] == "pending"]


def queue_deliveries(
    cursor: Cursor[Any], delivery_ids: Sequence[uuid.UUID | str], settings: Settings,
    *, from_status: str = "pending", delay: float | None = None,
    batch_size: BatchSize | None = None,
) -> list[DeliveryTask]:
    """Mark deliveries queued and group them into tasks; publish those after the commit.

    Only rows still in ``from_status`` are taken, so a row another process already
    queued, claimed or finished is left alone. ``delay``: seconds until they are due,
    from Postgres's ``now()`` for the row and the task's countdown alike.
    """
    if not delivery_ids:
        return []
    cursor.execute(
        """
        UPDATE deliveries SET status = 'queued', queued_at = clock_timestamp(), updated_at = now(),
            next_attempt_at = now() + make_interval(secs => coalesce(%s::float8, 0))
        WHERE id = ANY(%s::uuid[]) AND status = %s
        RETURNING id, channel, priority
        """,
        (delay, [str(i) for i in delivery_ids], from_status),
    )
    return group_into_tasks(cursor.fetchall(), settings, delay, batch_size=batch_size)


def group_into_tasks(
    rows: Iterable[tuple[uuid.UUID, str, str]], settings: Settings,
    delay: float | None = None, *, batch_size: BatchSize | None = None,
) -> list[DeliveryTask]:
    """Deliveries of one queue and channel to a task, ``batch_size`` of them per task;
    without one, full tasks of ``settings.delivery_batch_size``. ``delay``: the tasks'
    countdown, a relative wait (the broker's clock counts it, no host's clock is read)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for delivery_id, channel, priority in rows:
        groups[(delivery_queue(channel, priority), channel)].append(str(delivery_id))
    countdown = max(0.0, delay or 0.0)
    tasks = []
    for (queue, channel), ids in groups.items():
        size = batch_size(queue, len(ids)) if batch_size else settings.delivery_batch_size
        tasks += [DeliveryTask(channel, queue, ids[start:start + size], countdown)
                  for start in range(0, len(ids), size)]
    return tasks


#: SQL, true when the claimant of a ``sending`` row is gone and the row may be taken
#: again. A claimant holds an advisory lock on the row's ``claim_key`` for as long as it
#: lives (``delivery.Claim``): a lock this transaction can take is nobody's any more, and
#: taking it keeps it until this transaction ends (another sweep or claim fails to take
#: it meanwhile, and the row lock skips the row too). A row without a key was claimed by
#: a worker from before migration 0010 (during an upgrade): its holder cannot be seen, so
#: it is taken once ``%(lease)s`` (``NOTIFIER_SENDING_TIMEOUT``) has passed since its
#: claim. ``status = 'sending'`` comes first in the statements, so only such rows are
#: tried.
CLAIMANT_GONE = """CASE WHEN claim_key IS NULL THEN updated_at <= now() - %(lease)s
                        ELSE pg_try_advisory_xact_lock(claim_key) END"""


def sweep_due_deliveries(
    cursor: Cursor[Any], settings: Settings, limit: int = 10_000,
    *, batch_size: BatchSize | None = None,
) -> list[DeliveryTask]:
    """Queue again what should be moving and is not.

    * ``pending`` a while: the task was never published (the process died after commit);
    * ``retrying`` and due: a retry kept in Postgres because its wait was long;
    * ``scheduled`` and due: held for quiet hours or the notification's ``send_at``;
    * ``queued`` long past due: the broker lost the task (Redis keeps nothing on disk);
    * ``sending`` with its claimant gone: the worker that claimed it died mid-batch
      (``CLAIMANT_GONE``), found on the sweep after its death.
    """
    cursor.execute(
        f"""
        UPDATE deliveries SET status = 'queued', queued_at = clock_timestamp(), updated_at = now(),
            next_attempt_at = now()
        WHERE id IN (
            SELECT id FROM deliveries
            WHERE (status = 'pending' AND next_attempt_at <= now() - %(grace)s)
               OR (status IN ('retrying', 'scheduled') AND next_attempt_at <= now())
               OR (status = 'queued' AND next_attempt_at <= now() - %(queued)s
                   AND queued_at <= now() - %(queued)s)
               OR (status = 'sending' AND {CLAIMANT_GONE})
            LIMIT %(limit)s
            -- A row a worker is claiming is skipped; one it claimed (or sent) since this
            -- statement began is checked again on its new version and left alone.
            FOR UPDATE SKIP LOCKED
        )
        RETURNING id, channel, priority
        """,
        {
            "grace": timedelta(seconds=2 * settings.sweep_interval),
            "queued": timedelta(seconds=settings.queued_timeout),
            "lease": timedelta(seconds=settings.sending_timeout),
            "limit": limit,
        },
    )
    return group_into_tasks(cursor.fetchall(), settings, batch_size=batch_size)
