"""The in-app inbox: what the ``inapp`` channel delivered, per recipient, in four states.

**States.** A message is ``unread`` when delivered, ``seen`` once shown (the bell's
badge clears), ``read`` once opened, ``archived`` once put away. It only moves forward;
each step stamps its own column and every earlier one still empty (reading stamps
``seen_at`` too, archiving ``read_at`` too), so its state is its most advanced stamp and
``read_at IS NULL`` means "not read yet" in every state: the unread index and the
read-message retention (``notifier.pipeline.retention``) need nothing new, and an
archived message is purged like a read one, counted from when it was read.

**Paging.** Newest first, keyset on ``(created_at, id)``: a page's ``next_cursor`` is
the last message's position, opaque to callers (:func:`encode_cursor`). The in-app
channel makes ``created_at`` grow in commit order per recipient
(``notifier.channels.inapp``), so a cursor is also a point in the recipient's stream:
:func:`messages_after` answers everything committed after it, the catch-up of the live
feed (``notifier.pipeline.inbox_feed``) when a browser reconnects with its
``Last-Event-ID``.

The recipient is part of every condition: one recipient never reads or marks another's
messages. The statements are plain SQL shared by the synchronous functions here and the
feed's asynchronous connection (one text for each query).
"""

from __future__ import annotations

import base64
import binascii
import enum
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from notifier.storage.db import raw_cursor

#: Most messages on one page (and per query of a catch-up).
MAX_PAGE_SIZE = 200
#: Most ids one call may mark.
MAX_IDS = 1000
#: Longest recipient id (the column's length, and the notification contract's).
MAX_RECIPIENT_LENGTH = 255

#: A cursor: a version byte, microseconds since the epoch (signed 64-bit), the UUID.
_CURSOR = struct.Struct(">bq16s")
_CURSOR_VERSION = 1
#: base64url without padding of the 25 bytes above.
CURSOR_LENGTH = 34
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class State(enum.StrEnum):
    """Where a message is in its life, in order: it never goes back."""

    UNREAD = "unread"
    SEEN = "seen"
    READ = "read"
    ARCHIVED = "archived"


#: Per state: the column it stamps, the condition of the messages it moves (those not in
#: it or beyond), and the stamps it fills in on the way.
_MARKS: dict[State, tuple[str, str]] = {
    State.SEEN: ("seen_at IS NULL AND read_at IS NULL AND archived_at IS NULL",
                 "seen_at = now()"),
    State.READ: ("read_at IS NULL",
                 "read_at = now(), seen_at = coalesce(seen_at, now())"),
    State.ARCHIVED: ("archived_at IS NULL",
                     "archived_at = now(), read_at = coalesce(read_at, now()),"
                     " seen_at = coalesce(seen_at, now())"),
}

_COLUMNS = ("id, recipient_id, notification_id, digest_id, type, priority, title, body, data,"
            " created_at, seen_at, read_at, archived_at")

#: The messages of a recipient before a position, newest first (``%(before_*)s`` are the
#: far future when paging starts). ``created_at <= t`` is what the index can use; the
#: row comparison then only settles ties.
_PAGE_SQL = f"""
    SELECT {_COLUMNS} FROM inbox_messages
    WHERE recipient_id = %(recipient)s
      AND created_at <= %(before_at)s AND (created_at, id) < (%(before_at)s, %(before_id)s)
      {{filters}}
    ORDER BY created_at DESC, id DESC LIMIT %(limit)s
"""
#: The messages of a recipient after a position, oldest first: the feed's catch-up.
AFTER_SQL = f"""
    SELECT {_COLUMNS} FROM inbox_messages
    WHERE recipient_id = %(recipient)s
      AND created_at >= %(after_at)s AND (created_at, id) > (%(after_at)s, %(after_id)s)
    ORDER BY created_at, id LIMIT %(limit)s
"""
#: The newest position of a recipient's inbox (where a live stream starts).
HEAD_SQL = """
    SELECT created_at, id FROM inbox_messages WHERE recipient_id = %(recipient)s
    ORDER BY created_at DESC, id DESC LIMIT 1
"""
#: Messages by id (those the in-app channel announced), in stream order.
BY_IDS_SQL = f"""
    SELECT {_COLUMNS} FROM inbox_messages WHERE id = ANY(%(ids)s)
    ORDER BY recipient_id, created_at, id
"""
_COUNTS_SQL = """
    SELECT count(*) FILTER (WHERE seen_at IS NULL AND read_at IS NULL AND archived_at IS NULL),
           count(*) FILTER (WHERE seen_at IS NOT NULL AND read_at IS NULL),
           count(*) FILTER (WHERE read_at IS NOT NULL AND archived_at IS NULL),
           count(*) FILTER (WHERE archived_at IS NOT NULL)
    FROM inbox_messages WHERE recipient_id = %(recipient)s
"""


@dataclass(frozen=True, order=True)
class Position:
    """A point in a recipient's inbox: ``(created_at, id)``, in stream order."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        return encode_cursor(self)


#: Before every message (where a catch-up of a new inbox starts).
START = Position(datetime(1, 1, 2, tzinfo=UTC), uuid.UUID(int=0))
#: After every message (where paging starts).
END = Position(datetime(9999, 12, 30, tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))


@dataclass(frozen=True)
class InboxItem:
    """One inbox message as read from Postgres (shared by the pages and the live feed)."""

    id: uuid.UUID
    recipient_id: str
    notification_id: uuid.UUID | None
    digest_id: uuid.UUID | None
    type: str
    priority: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: datetime
    seen_at: datetime | None
    read_at: datetime | None
    archived_at: datetime | None

    @property
    def state(self) -> State:
        if self.archived_at:
            return State.ARCHIVED
        if self.read_at:
            return State.READ
        return State.SEEN if self.seen_at else State.UNREAD

    @property
    def position(self) -> Position:
        return Position(self.created_at, self.id)

    @property
    def cursor(self) -> str:
        """The message's place in the stream: a page's cursor and the SSE event id."""
        return encode_cursor(self.position)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready: ids and timestamps as strings, the state and the cursor added."""
        def when(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": str(self.id), "cursor": self.cursor, "state": self.state.value,
            "type": self.type, "priority": self.priority, "title": self.title,
            "body": self.body, "data": self.data,
            "notification_id": str(self.notification_id) if self.notification_id else None,
            "digest_id": str(self.digest_id) if self.digest_id else None,
            "created_at": when(self.created_at), "seen_at": when(self.seen_at),
            "read_at": when(self.read_at), "archived_at": when(self.archived_at),
        }


def item_from_row(row: Sequence[Any]) -> InboxItem:
    """An :class:`InboxItem` from a row of ``_COLUMNS`` (any of the statements above)."""
    return InboxItem(*row)


@dataclass(frozen=True)
class InboxPage:
    """One page, newest first; ``next_cursor`` is None on the last page."""

    items: list[InboxItem]
    next_cursor: str | None


def encode_cursor(position: Position) -> str:
    """An opaque, fixed-length (:data:`CURSOR_LENGTH`) string for a position."""
    micros = (position.created_at - _EPOCH) // timedelta(microseconds=1)
    packed = _CURSOR.pack(_CURSOR_VERSION, micros, position.id.bytes)
    return base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; ValueError naming ``cursor`` for anything else."""
    if not isinstance(cursor, str) or len(cursor) != CURSOR_LENGTH or not cursor.isascii():
        raise ValueError("cursor: not a cursor this inbox gave out (wrong length or type)")
    try:
        packed = base64.urlsafe_b64decode(cursor + "==")
        version, micros, raw_id = _CURSOR.unpack(packed)
        created_at = _EPOCH + timedelta(microseconds=micros)
    except (binascii.Error, struct.error, ValueError, OverflowError):
        raise ValueError("cursor: not a cursor this inbox gave out") from None
    position = Position(created_at, uuid.UUID(bytes=raw_id))
    if version != _CURSOR_VERSION or encode_cursor(position) != cursor:
        raise ValueError("cursor: not a cursor this inbox gave out")
    return position


def check_recipient(recipient_id: str) -> str:
    """The recipient id, or ValueError naming ``recipient_id`` (hostile input bounded)."""
    if not isinstance(recipient_id, str) or not recipient_id.strip():
        raise ValueError("recipient_id: must be a non-empty string")
    if len(recipient_id) > MAX_RECIPIENT_LENGTH:
        raise ValueError(f"recipient_id: at most {MAX_RECIPIENT_LENGTH} characters"
                         f" (got {len(recipient_id)})")
    return recipient_id


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit: must be an integer from 1 to {MAX_PAGE_SIZE} (got {limit!r})")
    return limit


def parse_ids(message_ids: Sequence[uuid.UUID | str]) -> list[uuid.UUID]:
    """Message ids as UUIDs, or ValueError naming ``ids`` and the bad item."""
    if isinstance(message_ids, str | bytes) or len(message_ids) > MAX_IDS:
        raise ValueError(f"ids: a list of at most {MAX_IDS} message ids")
    parsed = []
    for index, value in enumerate(message_ids):
        try:
            parsed.append(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)[:64]))
        except ValueError:
            raise ValueError(f"ids: item {index} is not a UUID (got {str(value)[:40]!r})") from None
    return parsed


def list_page(
    session: Session, recipient_id: str, *, cursor: str | None = None, unread_only: bool = False,
    include_archived: bool = False, limit: int = 50,
) -> InboxPage:
    """A page of the recipient's messages, newest first, after ``cursor`` (a previous
    page's ``next_cursor``) or from the newest.

    ``unread_only``: not read yet (``unread`` and ``seen``); otherwise every message but
    the archived ones, unless ``include_archived``.
    """
    check_recipient(recipient_id)
    check_limit(limit)
    before = decode_cursor(cursor) if cursor is not None else END
    # Archived messages are read: unread_only leaves them out whatever include_archived says.
    filters = ("AND read_at IS NULL" if unread_only
               else "" if include_archived else "AND archived_at IS NULL")
    sql = _PAGE_SQL.format(filters=filters)
    rows = raw_cursor(session).execute(sql, {
        "recipient": recipient_id, "before_at": before.created_at, "before_id": before.id,
        "limit": limit + 1,
    }).fetchall()
    items = [item_from_row(row) for row in rows[:limit]]
    return InboxPage(items, items[-1].cursor if len(rows) > limit else None)


def list_inbox(
    session: Session, recipient_id: str, *, unread_only: bool = True, limit: int = 50,
    include_archived: bool = False,
) -> list[InboxItem]:
    """The recipient's newest messages (the first page)."""
    return list_page(session, recipient_id, unread_only=unread_only, limit=limit,
                     include_archived=include_archived).items


def messages_after(
    session: Session, recipient_id: str, cursor: str | None, *, limit: int = MAX_PAGE_SIZE,
) -> list[InboxItem]:
    """Up to ``limit`` messages committed after ``cursor`` (from the first one when None),
    oldest first, whatever their state: what a stream missed."""
    check_recipient(recipient_id)
    check_limit(limit)
    after = decode_cursor(cursor) if cursor is not None else START
    rows = raw_cursor(session).execute(AFTER_SQL, {
        "recipient": recipient_id, "after_at": after.created_at, "after_id": after.id,
        "limit": limit,
    }).fetchall()
    return [item_from_row(row) for row in rows]


def count_states(session: Session, recipient_id: str) -> dict[State, int]:
    """How many of the recipient's messages are in each state, in one query."""
    check_recipient(recipient_id)
    row = raw_cursor(session).execute(_COUNTS_SQL, {"recipient": recipient_id}).fetchone()
    return dict(zip(State, row or (0, 0, 0, 0), strict=True))


def count_unread(session: Session, recipient_id: str) -> int:
    """Messages not read yet (``unread`` and ``seen``)."""
    counts = count_states(session, recipient_id)
    return counts[State.UNREAD] + counts[State.SEEN]


def mark(
    session: Session, recipient_id: str, state: State | str,
    message_ids: Sequence[uuid.UUID | str] | None = None, *, until: str | None = None,
) -> int:
    """Move messages forward to ``state`` (seen, read or archived): the ids given, or
    every one not there yet when ``message_ids`` is None (only those at or before the
    cursor ``until``, if given: "mark all read" then spares what arrived since the
    page was shown). Returns how many moved: a message already there or beyond is left
    alone, so marking twice moves nothing the second time.
    """
    check_recipient(recipient_id)
    try:
        target = State(state)
        condition, stamps = _MARKS[target]
    except (ValueError, KeyError):
        raise ValueError(
            f"state: must be seen, read or archived (got {str(state)[:40]!r})") from None
    params: dict[str, Any] = {"recipient": recipient_id}
    if message_ids is not None:
        params["ids"] = parse_ids(message_ids)
        condition += " AND id = ANY(%(ids)s)"
    if until is not None:
        position = decode_cursor(until)
        params |= {"until_at": position.created_at, "until_id": position.id}
        condition += (" AND created_at <= %(until_at)s"
                      " AND (created_at, id) <= (%(until_at)s, %(until_id)s)")
    result = raw_cursor(session).execute(
        f"UPDATE inbox_messages SET {stamps} WHERE recipient_id = %(recipient)s AND {condition}",
        params,
    )
    return result.rowcount


def mark_read(
    session: Session, recipient_id: str, message_ids: Sequence[uuid.UUID | str] | None = None
) -> int:
    """Mark messages read (all unread ones when no ids are given); returns how many."""
    return mark(session, recipient_id, State.READ, message_ids)
