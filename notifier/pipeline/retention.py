"""Retention: forget what the pipeline no longer needs, in bounded steps.

Every table grows by the traffic it carries; beat's ``notifier.purge_expired`` deletes,
per table, the rows whose retention (``NOTIFIER_RETENTION_*``) has passed and that
nothing still needs:

* **never purged**: a pending notification (it waits in a window), a notification or
  digest with any delivery left, a delivery while another delivery of its notification
  or digest is pending, queued, sending, retrying or scheduled, a window that still
  holds a waiting notification, an unread inbox message (unless the operator sets a
  retention for them), and any row locked by the pipeline at that moment;
* **order** follows the foreign keys (none cascades): deliveries first, then the
  notifications they pointed at, then digests (referenced by both).

Each batch is one ``DELETE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)``
in its own short transaction with a lock timeout, so a purge never waits for the
pipeline's rows nor holds its own for long. A run loops while batches come back full,
pausing between them, and stops after ``retention_run_seconds``; the next run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from notifier.settings import Settings
from notifier.storage.db import session_scope
from notifier.storage.models import FINISHED_DELIVERY_STATUSES, NotificationStatus

log = logging.getLogger(__name__)

#: A delivery in one of these is done: nothing will send it again by itself.
FINISHED_DELIVERIES = FINISHED_DELIVERY_STATUSES
#: Every notification status but ``pending`` (waiting in an aggregation window).
SETTLED_NOTIFICATIONS = tuple(s for s in NotificationStatus if s != NotificationStatus.PENDING)

_DAY = 86400.0


@dataclass(frozen=True)
class Purge:
    """One table's rule: its statement and how old (seconds) a row must be, or None
    when the operator keeps that table's rows forever."""

    table: str
    sql: str
    age: Callable[[Settings], float | None]


def _days(field: str) -> Callable[[Settings], float | None]:
    return lambda settings: getattr(settings, field) * _DAY or None


#: In the order the foreign keys need. ``:age`` is seconds, ``:n`` the batch size. Each
#: batch walks the index of its age column, oldest first (``ORDER BY``: without it the
#: notifications batch walked the primary key through every row deleted before it,
#: 118 ms a batch instead of 48 ms at 400,000 rows); deliveries use (status, updated_at).
PURGES: tuple[Purge, ...] = (
    Purge("deliveries", """
        DELETE FROM deliveries WHERE id IN (
            SELECT d.id FROM deliveries d
            WHERE d.status = ANY(:finished)
              AND d.updated_at < now() - make_interval(secs => :age)
              AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.notification_id = d.notification_id
                              AND o.status <> ALL(:finished))
              AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.digest_id = d.digest_id
                              AND o.status <> ALL(:finished))
            LIMIT :n FOR UPDATE OF d SKIP LOCKED)
        """, _days("retention_deliveries_days")),
    # created_at <= updated_at: the bound on created_at lets its index find candidates.
    Purge("notifications", """
        DELETE FROM notifications WHERE id IN (
            SELECT n.id FROM notifications n
            WHERE n.created_at < now() - make_interval(secs => :age)
              AND n.updated_at < now() - make_interval(secs => :age)
              AND n.status = ANY(:settled)
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id)
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.digest_id = n.digest_id
                              AND d.status <> ALL(:finished))
            ORDER BY n.created_at LIMIT :n FOR UPDATE OF n SKIP LOCKED)
        """, _days("retention_notifications_days")),
    Purge("digests", """
        DELETE FROM digests WHERE id IN (
            SELECT g.id FROM digests g
            WHERE g.created_at < now() - make_interval(secs => :age)
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.digest_id = g.id)
              AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.digest_id = g.id)
            ORDER BY g.created_at LIMIT :n FOR UPDATE OF g SKIP LOCKED)
        """, _days("retention_digests_days")),
    Purge("aggregation_windows", """
        DELETE FROM aggregation_windows WHERE id IN (
            SELECT w.id FROM aggregation_windows w
            WHERE w.due_at < now() - make_interval(secs => :age)
              AND NOT EXISTS (SELECT 1 FROM notifications n
                              WHERE n.window_id = w.id AND n.status = 'pending')
            ORDER BY w.due_at LIMIT :n FOR UPDATE OF w SKIP LOCKED)
        """, lambda settings: settings.retention_windows_hours * 3600 or None),
    Purge("inbox_messages", """
        DELETE FROM inbox_messages WHERE id IN (
            SELECT id FROM inbox_messages
            WHERE read_at < now() - make_interval(secs => :age)
            ORDER BY read_at LIMIT :n FOR UPDATE SKIP LOCKED)
        """, _days("retention_inbox_read_days")),
    Purge("inbox_messages (unread)", """
        DELETE FROM inbox_messages WHERE id IN (
            SELECT id FROM inbox_messages
            WHERE read_at IS NULL AND created_at < now() - make_interval(secs => :age)
            LIMIT :n FOR UPDATE SKIP LOCKED)
        """, _days("retention_inbox_unread_days")),
    Purge("dead_letters", """
        DELETE FROM dead_letters WHERE id IN (
            SELECT id FROM dead_letters
            WHERE created_at < now() - make_interval(secs => :age)
            ORDER BY created_at LIMIT :n FOR UPDATE SKIP LOCKED)
        """, _days("retention_dead_letters_days")),
    # Status callbacks sent or parked, as long as finished deliveries are kept (a
    # callback outlives its delivery harmlessly: it holds its URL and ids itself).
    Purge("callbacks", """
        DELETE FROM callbacks WHERE id IN (
            SELECT id FROM callbacks
            WHERE state IN ('sent', 'dead')
              AND updated_at < now() - make_interval(secs => :age)
            ORDER BY updated_at LIMIT :n FOR UPDATE SKIP LOCKED)
        """, _days("retention_deliveries_days")),
    # Keys matter only within the dedup window: their own expiry, whatever the settings.
    Purge("idempotency_keys", """
        DELETE FROM idempotency_keys WHERE key IN (
            SELECT key FROM idempotency_keys
            WHERE expires_at <= now() - make_interval(secs => :age)
            ORDER BY expires_at LIMIT :n FOR UPDATE SKIP LOCKED)
        """, lambda settings: 0.0),
)


def purge_batch(session: Session, purge: Purge, age: float, batch_size: int,
                lock_timeout: float) -> int:
    """Delete up to ``batch_size`` rows of one table in the caller's transaction."""
    session.execute(text("SELECT set_config('lock_timeout', :ms, true)"),
                    {"ms": f"{max(1, round(lock_timeout * 1000))}ms"})
    result = session.execute(text(purge.sql), {
        "age": age, "n": batch_size, "finished": list(FINISHED_DELIVERIES),
        "settled": [s.value for s in SETTLED_NOTIFICATIONS],
    })
    return cast("CursorResult[Any]", result).rowcount


def purge_expired(
    settings: Settings, *, sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, int]:
    """One retention run over every table; rows deleted per table (tables with none left out).

    Stops early (the next run continues) once ``retention_run_seconds`` have passed (at
    most half the visibility timeout: acknowledged late, a longer task would be handed
    to a second worker). A table locked past the lock timeout is left for the next run.
    """
    deadline = clock() + min(settings.retention_run_seconds, settings.visibility_timeout / 2)
    purged: dict[str, int] = {}
    for purge in PURGES:
        age = purge.age(settings)
        if age is None:
            continue
        while True:
            try:
                with session_scope() as session:
                    deleted = purge_batch(session, purge, age, settings.retention_batch_size,
                                          settings.retention_lock_timeout)
            except OperationalError as exc:
                log.warning("retention: %s skipped until the next run: %s", purge.table,
                            str(getattr(exc, "orig", exc)).splitlines()[0][:200])
                break
            if deleted:
                purged[purge.table] = purged.get(purge.table, 0) + deleted
            if deleted < settings.retention_batch_size:
                break
            if clock() >= deadline:
                log.info("retention: run time used up; the next run goes on (%s)", purged)
                return purged
            sleep(settings.retention_batch_pause)
    return purged

