"""Cancelling a notification that has not gone out yet.

A notification waiting in an aggregation window is taken out of it (it never appears in
a digest); one dispatched but held (quiet hours, ``send_at``) or not yet sent has its
unsent deliveries cancelled. Once anything of it was sent, or once it was folded into a
digest, it is too late, and the answer says so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from notifier.schemas import NotificationError
from notifier.storage.db import session_scope
from notifier.storage.models import SENT_DELIVERY_STATUSES
from notifier.storage.models import UNSENT_DELIVERY_STATUSES as UNSENT


@dataclass(frozen=True)
class CancelOutcome:
    notification_id: str | None
    cancelled: bool
    #: The status it has now, or why nothing was found.
    status: str


def cancel_by(notification_id: str | None, idempotency_key: str | None) -> CancelOutcome:
    """Cancel by id or by idempotency key (exactly one), in a transaction of its own."""
    if (notification_id is None) == (idempotency_key is None):
        raise NotificationError(["cancel: give a notification id or an idempotency key"])
    with session_scope() as session:
        if idempotency_key is not None:
            notification_id = find_by_idempotency_key(session, idempotency_key)
            if notification_id is None:
                return CancelOutcome(None, False, f"no notification with idempotency key"
                                                  f" {idempotency_key!r}")
        return cancel_notification(session, str(notification_id))


def find_by_idempotency_key(session: Session, key: str) -> str | None:
    found = session.execute(
        text("SELECT notification_id FROM idempotency_keys WHERE key = :key"), {"key": key}
    ).scalar()
    if found is None:
        found = session.execute(
            text("SELECT id FROM notifications WHERE idempotency_key = :key"
                 " ORDER BY created_at LIMIT 1"),
            {"key": key},
        ).scalar()
    return str(found) if found else None


def cancel_notification(session: Session, notification_id: str) -> CancelOutcome:
    """Cancel it if nothing of it has left; the row lock makes a racing flush wait."""
    try:
        uuid.UUID(notification_id)
    except ValueError:
        return CancelOutcome(None, False, f"not a notification id: {notification_id!r}")
    status = session.execute(
        text("SELECT status FROM notifications WHERE id = :id FOR UPDATE"),
        {"id": notification_id},
    ).scalar()
    if status is None:
        return CancelOutcome(notification_id, False, "not found")
    if status == "pending":
        return _cancel(session, notification_id)
    if status == "dispatched":
        gone = _delivery_gone(session, notification_id)
        if gone is None:
            return _cancel(session, notification_id)
        return CancelOutcome(notification_id, False, gone)
    return CancelOutcome(notification_id, False, status)


def _delivery_gone(session: Session, notification_id: str) -> str | None:
    """The status of a delivery of it that is sending, sent (or past it), dead or
    suppressed (then cancelling is too late), or None. The rows are locked first: a
    delivery worker claims with SKIP LOCKED, so none can start sending between this
    check and the cancel."""
    statuses = set(session.execute(
        text("SELECT status FROM deliveries WHERE notification_id = :id ORDER BY id"
             " FOR UPDATE"),
        {"id": notification_id},
    ).scalars())
    gone = statuses - {*UNSENT, "cancelled"}
    too_late = (*SENT_DELIVERY_STATUSES, "sending", "dead", "suppressed")
    return next((s for s in too_late if s in gone), None)


def _cancel(session: Session, notification_id: str) -> CancelOutcome:
    session.execute(
        text("UPDATE deliveries SET status = 'cancelled', updated_at = now()"
             " WHERE notification_id = :id AND status = ANY(:unsent)"),
        {"id": notification_id, "unsent": list(UNSENT)},
    )
    session.execute(
        text("UPDATE notifications SET status = 'cancelled', window_id = NULL,"
             " status_reason = 'cancelled on request', updated_at = clock_timestamp()"
             " WHERE id = :id"),
        {"id": notification_id},
    )
    return CancelOutcome(notification_id, True, "cancelled")
