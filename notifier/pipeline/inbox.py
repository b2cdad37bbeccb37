"""The in-app inbox: what the ``inapp`` channel delivered, read and unread per recipient."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from notifier.storage.models import InboxMessage


def list_inbox(
    session: Session, recipient_id: str, *, unread_only: bool = True, limit: int = 50
) -> list[InboxMessage]:
    """The recipient's newest inbox messages."""
    query = select(InboxMessage).where(InboxMessage.recipient_id == recipient_id)
    if unread_only:
        query = query.where(InboxMessage.read_at.is_(None))
    query = query.order_by(InboxMessage.created_at.desc(), InboxMessage.id.desc())
    return list(session.scalars(query.limit(limit)))


def count_unread(session: Session, recipient_id: str) -> int:
    return session.scalar(
        select(func.count()).select_from(InboxMessage)
        .where(InboxMessage.recipient_id == recipient_id, InboxMessage.read_at.is_(None))
    ) or 0


def mark_read(
    session: Session, recipient_id: str, message_ids: Sequence[uuid.UUID | str] | None = None
) -> int:
    """Mark messages read (all unread ones when no ids are given); returns how many.

    The recipient is part of the condition so one recipient can never mark another's.
    """
    query = update(InboxMessage).where(
        InboxMessage.recipient_id == recipient_id, InboxMessage.read_at.is_(None)
    )
    if message_ids is not None:
        query = query.where(InboxMessage.id.in_([uuid.UUID(str(i)) for i in message_ids]))
    result = session.execute(query.values(read_at=func.now()))
    return cast("CursorResult[Any]", result).rowcount
