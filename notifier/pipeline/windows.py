"""Aggregation windows: the open window of each group, opened, filled and closed.

Windows live in ``aggregation_windows`` with their due time, so the flush finds due
groups with one indexed query (``notifier.pipeline.flush``). Ingest serialises on a
transaction-scoped advisory lock per group, so two batches never open two windows for
one group.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from notifier.ids import uuid7
from notifier.pipeline.preferences import Preferences, next_digest_at
from notifier.pipeline.rules import Rule

if TYPE_CHECKING:
    from psycopg import Cursor

GroupKey = tuple[str, str, str]  # recipient, type, digest key


@dataclass
class Window:
    id: uuid.UUID
    key: GroupKey
    mode: str
    opened_at: datetime
    due_at: datetime
    latest_due_at: datetime
    max_count: int  # 0: no maximum (a recipient's hourly/daily/weekly digest)
    item_count: int = 0
    closed: bool = False


@dataclass(frozen=True)
class Waiting:
    """A notification that waits for a digest, with what choosing its window needs."""

    id: uuid.UUID
    key: GroupKey
    rule: Rule
    #: The recipient's: a digest slot of theirs (hourly, daily...) replaces the rule's window.
    preferences: Preferences
    timezone: str


def group_key(notification: Any, rule: Rule) -> GroupKey:
    value = notification.data.get(rule.digest_key) if rule.digest_key else None
    key = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return (notification.recipient_id, notification.type, key[:255])


def assign_windows(
    cursor: Cursor[Any], waiting: Sequence[Waiting], now: datetime
) -> dict[uuid.UUID, uuid.UUID | None]:
    """Put each waiting notification in its group's open window (opening windows as
    needed) and write the windows. Returns each one's window id, or None for the first
    of a new ``leading`` window: that one goes at once, the rest of its group waits."""
    if not waiting:
        return {}
    keys = sorted({item.key for item in waiting})
    lock_groups(cursor, keys)
    open_windows = load_open_windows(cursor, keys, now)
    touched: dict[uuid.UUID, Window] = {}
    opened: set[uuid.UUID] = set()
    placed: dict[uuid.UUID, uuid.UUID | None] = {}
    for item in waiting:
        key = item.key
        window = open_windows.get(key)
        if window is None:
            window = open_window(item, now)
            open_windows[key] = touched[window.id] = window
            opened.add(window.id)
            if window.mode == "leading":  # the first goes at once, the rest wait
                placed[item.id] = None
                continue
        add_to_window(window, item.rule, now)
        touched[window.id] = window
        placed[item.id] = window.id
        if window.closed:
            del open_windows[key]
            follower = continuation(window, now)
            if follower:
                open_windows[key] = touched[follower.id] = follower
                opened.add(follower.id)
    insert_windows(cursor, [w for w in touched.values() if w.id in opened])
    update_windows(cursor, [w for w in touched.values() if w.id not in opened])
    return placed


def lock_groups(cursor: Cursor[Any], keys: Sequence[GroupKey]) -> None:
    """Serialise batches that touch the same groups (in one global order: no deadlock)."""
    cursor.execute(
        "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(g, 0) AS h"
        " FROM unnest(%s::text[]) AS g ORDER BY h) AS locks",
        (["\x1f".join(key) for key in keys],),
    )


def load_open_windows(
    cursor: Cursor[Any], keys: Sequence[GroupKey], now: datetime
) -> dict[GroupKey, Window]:
    """The groups' windows still open at ``now``, locked. A window whose due time has
    passed is over even if no flush has taken it yet: a later item opens the next one."""
    cursor.execute(
        """
        SELECT w.id, w.recipient_id, w.type, w.digest_key, w.mode, w.opened_at, w.due_at,
               w.latest_due_at, w.max_count, w.item_count
        FROM aggregation_windows w
        JOIN unnest(%s::text[], %s::text[], %s::text[]) AS g(r, t, k)
          ON w.recipient_id = g.r AND w.type = g.t AND w.digest_key = g.k
        WHERE NOT w.closed AND w.due_at > %s
        ORDER BY w.id
        FOR UPDATE OF w
        """,
        [*(list(column) for column in zip(*keys, strict=True)), now],
    )
    return {
        (row[1], row[2], row[3]): Window(row[0], (row[1], row[2], row[3]), row[4], row[5],
                                         row[6], row[7], row[8], row[9])
        for row in cursor.fetchall()
    }


def open_window(item: Waiting, now: datetime) -> Window:
    """A new window: the rule's, or the recipient's hourly/daily/weekly digest slot."""
    digest_at = next_digest_at(item.preferences, item.timezone, now)
    if digest_at is not None:
        return Window(uuid7(), item.key, "digest", now, digest_at, digest_at, max_count=0)
    rule = item.rule
    due = now + rule.window
    latest = now + rule.longest_wait if rule.mode == "sliding" else due
    return Window(uuid7(), item.key, rule.mode, now, due, latest, rule.max_count)


def continuation(closed: Window, now: datetime) -> Window | None:
    """The rest of a leading window's period after a burst filled it early: an empty
    window to its original end, so the next item waits instead of leading again (a long
    burst becomes the lead item and full digests, not every sixth item on its own)."""
    if closed.mode != "leading" or closed.latest_due_at <= now:
        return None
    return Window(uuid7(), closed.key, closed.mode, now, closed.latest_due_at,
                  closed.latest_due_at, closed.max_count)


def add_to_window(window: Window, rule: Rule, now: datetime) -> None:
    window.item_count += 1
    if window.mode == "sliding":
        window.due_at = min(now + rule.window, window.latest_due_at)
    if window.max_count and window.item_count >= window.max_count:
        window.closed = True  # due at the next flush; new items open the next window
        window.due_at = min(window.due_at, now)


def insert_windows(cursor: Cursor[Any], windows: Sequence[Window]) -> None:
    if not windows:
        return
    rows = [
        (w.id, w.key[0], w.key[1], w.key[2], w.mode, w.opened_at, w.due_at, w.latest_due_at,
         w.item_count, w.max_count, w.closed)
        for w in windows
    ]
    cursor.execute(
        """
        INSERT INTO aggregation_windows (id, recipient_id, type, digest_key, mode, opened_at,
            due_at, latest_due_at, item_count, max_count, closed)
        SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::timestamptz[], %s::timestamptz[], %s::timestamptz[], %s::int[], %s::int[],
            %s::bool[])
        """,
        [list(column) for column in zip(*rows, strict=True)],
    )


def update_windows(cursor: Cursor[Any], windows: Sequence[Window]) -> None:
    """New counts and due times of windows that took items (locked by load_open_windows)."""
    if not windows:
        return
    cursor.execute(
        """
        UPDATE aggregation_windows w SET due_at = u.due_at, item_count = u.item_count,
            closed = u.closed
        FROM unnest(%s::uuid[], %s::timestamptz[], %s::int[], %s::bool[])
            AS u(id, due_at, item_count, closed)
        WHERE w.id = u.id
        """,
        ([w.id for w in windows], [w.due_at for w in windows],
         [w.item_count for w in windows], [w.closed for w in windows]),
    )
