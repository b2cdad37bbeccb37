"""The database-facing API: what a service asks of notifier's Postgres.

Look up a notification by idempotency key, read and mark a recipient's in-app inbox,
read and change a recipient's preferences, cancel a notification not yet sent. These
calls need the database (``NOTIFIER_DATABASE_URL``) and the ``server`` extra; a service
that only sends notifications imports :mod:`notifier.client`, which needs the broker
alone. ``notifier.client.lookup`` and the like still work: the old spelling, kept as an
alias that imports this module on first use.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from notifier.masking import mask_secrets
from notifier.pipeline.cancel import cancel_by
from notifier.pipeline.inbox import InboxItem, State, count_states, list_page
from notifier.pipeline.inbox import mark as mark_inbox
from notifier.pipeline.preferences import get_recipient_preferences
from notifier.pipeline.preferences import set_preferences as store_preferences
from notifier.storage.db import session_scope
from notifier.storage.models import IdempotencyKey


def lookup(idempotency_key: str) -> str | None:
    """The id of the notification stored under an idempotency key, if still remembered."""
    with session_scope() as session:
        found = session.scalar(
            select(IdempotencyKey.notification_id).where(IdempotencyKey.key == idempotency_key)
        )
    return str(found) if found else None


def notification(notification_id: str | uuid.UUID) -> dict[str, Any] | None:
    """A notification's status and why (``reason``), with its deliveries (each channel's
    status, attempts and the provider that sent it) and, once it was folded into a
    digest, the digest's; None if Postgres does not hold it (unknown, purged, or not
    ingested yet)."""
    with session_scope() as session:
        found = session.execute(text(
            "SELECT id, recipient_id, type, priority, channels, status, status_reason,"
            " idempotency_key, digest_id, send_at, created_at, updated_at"
            " FROM notifications WHERE id = :id"), {"id": notification_id}).mappings().first()
        if found is None:
            return None
        deliveries = session.execute(text(
            "SELECT id, channel, status, attempts, last_error, next_attempt_at, sent_at,"
            " provider, provider_detail, provider_status_at, digest_id, updated_at FROM deliveries"
            " WHERE notification_id = :id OR digest_id = CAST(:digest AS uuid)"
            " ORDER BY created_at, id"),
            {"id": notification_id, "digest": found["digest_id"]},
        ).mappings().all()
    return {
        **{key: value for key, value in found.items() if key != "status_reason"},
        "reason": found["status_reason"],
        "deliveries": [
            {**row, "last_error": row["last_error"] and mask_secrets(row["last_error"]),
             "provider_detail": row["provider_detail"] and mask_secrets(row["provider_detail"])}
            for row in deliveries
        ],
    }


def inbox(recipient_id: str, *, unread_only: bool = True, limit: int = 50,
          include_archived: bool = False) -> list[dict[str, Any]]:
    """The recipient's in-app messages, newest first (what an app shows in its bell menu):
    not read yet by default, else all but the archived ones unless ``include_archived``."""
    items: list[dict[str, Any]] = inbox_page(
        recipient_id, unread_only=unread_only, limit=limit, include_archived=include_archived,
    )["items"]
    return items


def inbox_page(recipient_id: str, *, cursor: str | None = None, unread_only: bool = False,
               include_archived: bool = False, limit: int = 50) -> dict[str, Any]:
    """One page of the inbox, newest first: ``{"items": [...], "next_cursor": str|None}``;
    pass ``next_cursor`` back as ``cursor`` for the next page. ValueError names a bad
    ``cursor``, ``limit`` or ``recipient_id``."""
    with session_scope() as session:
        page = list_page(session, recipient_id, cursor=cursor, unread_only=unread_only,
                         include_archived=include_archived, limit=limit)
    return {"items": [_inbox_dict(item) for item in page.items], "next_cursor": page.next_cursor}


def _inbox_dict(item: InboxItem) -> dict[str, Any]:
    """An item as ``inbox`` has always answered it (datetimes), with the state and cursor."""
    return {"id": str(item.id), "type": item.type, "priority": item.priority,
            "title": item.title, "body": item.body, "data": item.data,
            "created_at": item.created_at, "seen_at": item.seen_at, "read_at": item.read_at,
            "archived_at": item.archived_at, "state": item.state.value, "cursor": item.cursor,
            "notification_id": str(item.notification_id) if item.notification_id else None,
            "digest_id": str(item.digest_id) if item.digest_id else None}


def inbox_counts(recipient_id: str) -> dict[str, int]:
    """How many of the recipient's messages are unread, seen, read and archived."""
    with session_scope() as session:
        return {state.value: count for state, count in count_states(session, recipient_id).items()}


def mark_inbox_messages(recipient_id: str, state: str, message_ids: Iterable[str] | None = None,
                        *, until: str | None = None) -> int:
    """Move the recipient's messages forward to ``state`` (``seen``, ``read``, ``archived``):
    the ids given, or all (up to the cursor ``until``); returns how many moved."""
    with session_scope() as session:
        ids = None if message_ids is None else list(message_ids)
        return mark_inbox(session, recipient_id, state, ids, until=until)


def mark_read(recipient_id: str, message_ids: Iterable[str] | None = None) -> int:
    """Mark the recipient's inbox messages read (all unread when no ids); returns how many."""
    return mark_inbox_messages(recipient_id, State.READ, message_ids)


def set_preferences(recipient_id: str, **changes: Any) -> dict[str, Any]:
    """Change a recipient's fields and preferences (creating the recipient if missing).

    Takes the fields :func:`get_preferences` returns: ``name``, ``email``, ``phone``,
    ``timezone``, ``addresses`` (merged per channel; None removes one) and the
    preferences (``channels``, ``opt_out``, ``min_priority``, ``quiet_hours``,
    ``digest_mode``, ``digest_time``, ``digest_day``; None restores the default).
    Raises NotificationError naming each bad field; returns what is now stored.
    """
    with session_scope() as session:
        store_preferences(session, recipient_id, changes)
        stored = _fields_and_preferences(session, recipient_id.strip())
    return stored or {}  # never empty: the recipient was written in this transaction


def get_preferences(recipient_id: str) -> dict[str, Any] | None:
    """The recipient's fields and preferences (defaults filled in), or None if unknown."""
    with session_scope() as session:
        return _fields_and_preferences(session, recipient_id)


def _fields_and_preferences(session: Session, recipient_id: str) -> dict[str, Any] | None:
    found = get_recipient_preferences(session, recipient_id)
    if found is None:
        return None
    prefs, recipient = found
    return {**recipient, **prefs.model_dump(mode="json")}


def cancel(notification_id: str | None = None, *, idempotency_key: str | None = None) -> bool:
    """Cancel a notification that has not gone out yet; True if it was cancelled.

    Works while it waits in an aggregation window (it never joins a digest) or while its
    deliveries are held (quiet hours, ``send_at``). Once something of it was sent, or it
    was folded into a digest, it returns False: there is nothing left to take back.
    Raises NotificationError if neither or both ways of naming it are given.
    """
    return cancel_by(notification_id, idempotency_key).cancelled


def stored_ids(ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these notification ids Postgres holds (what
    :meth:`notifier.client.ConfirmingProducer.confirm` asks)."""
    found: set[uuid.UUID] = set()
    with session_scope() as session:
        for start in range(0, len(ids), 10_000):
            rows = session.execute(
                text("SELECT id FROM notifications WHERE id = ANY(:ids)"),
                {"ids": ids[start:start + 10_000]},
            )
            found.update(row[0] for row in rows)
    return found
