"""Aggregation windows: the open window of each group, opened, filled and closed.

Windows live in ``aggregation_windows`` with their due time, so the flush finds due
groups with one indexed query (``notifier.pipeline.flush``). A partial unique index
allows one open (not ``closed``) window per group, so two batches that open a group's
window at once meet on it: the second waits for the first, then adds to its window.
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

    from notifier.schemas import Notification

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


def group_key(notification: Notification, rule: Rule) -> GroupKey:
    value = notification["data"].get(rule.digest_key) if rule.digest_key else None
    key = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return (notification["recipient_id"], notification["type"], key[:255])


def assign_windows(
    cursor: Cursor[Any], waiting: Sequence[Waiting], now: datetime
) -> dict[uuid.UUID, uuid.UUID | None]:
    """Put each waiting notification in its group's open window (opening windows as
    needed) and write the windows. Returns each one's window id, or None for the first
    of a new ``leading`` window: that one goes at once, the rest of its group waits.

    One statement upserts the open window of every group of the batch
    (:func:`upsert_windows`); the few groups it cannot settle (a window past its due
    time, one that overflows its maximum, a leading window that fills) are then worked
    out one item at a time (:func:`assign_rest`) on rows the upsert has already locked.
    """
    if not waiting:
        return {}
    groups: dict[GroupKey, list[Waiting]] = {}
    for item in waiting:
        groups.setdefault(item.key, []).append(item)
    fresh = {key: open_window(items[0], now) for key, items in groups.items()}
    placed: dict[uuid.UUID, uuid.UUID | None] = {}
    reserved: dict[GroupKey, Window] = {}
    for key, window_id, inserted in upsert_windows(cursor, groups, fresh, now):
        items = groups.pop(key)
        if inserted and not _settles(fresh[key], len(items)):
            reserved[key] = fresh[key]  # holds the group's slot; assign_rest fills it
            groups[key] = items
            continue
        leads = inserted and fresh[key].mode == "leading"
        for index, item in enumerate(items):
            placed[item.id] = None if leads and index == 0 else window_id
    if groups:
        rest = [item for item in waiting if item.key in groups]
        placed.update(assign_rest(cursor, rest, reserved, now))
    return placed


def _fresh_count(window: Window, items: int) -> int:
    """Items a new window of ``items`` holds: a leading window's first one goes at once."""
    return items - 1 if window.mode == "leading" else items


def _settles(window: Window, items: int) -> bool:
    """Whether a new window taking all ``items`` is the whole story: it does not
    overflow its maximum, and a leading one does not fill (that needs a continuation)."""
    count = _fresh_count(window, items)
    return (not window.max_count or count < window.max_count
            or (count == window.max_count and window.mode != "leading"))


#: Upsert every group's open window at once (see :func:`upsert_windows`). ``n`` is the
#: count of items joining: as a new window's count, or added to the open one (for a
#: would-be leading window, one more: its first item joins an existing window).
_UPSERT_WINDOWS = """
INSERT INTO aggregation_windows AS w (id, recipient_id, type, digest_key, mode, opened_at,
    due_at, latest_due_at, item_count, max_count, closed)
SELECT (g->>0)::uuid, g->>1, g->>2, g->>3, g->>4, %(now)s, (g->>5)::timestamptz,
    (g->>6)::timestamptz, (g->>7)::int, (g->>8)::int, (g->>9)::bool
FROM json_array_elements(%(groups)s::json) AS g
ORDER BY 2, 3, 4
ON CONFLICT (recipient_id, type, digest_key) WHERE NOT closed DO UPDATE SET
    item_count = w.item_count + {joining},
    due_at = CASE WHEN w.max_count > 0 AND w.item_count + {joining} >= w.max_count
                  THEN least({due}, %(now)s) ELSE {due} END,
    closed = w.max_count > 0 AND w.item_count + {joining} >= w.max_count
WHERE w.due_at > %(now)s
  AND (w.max_count = 0 OR w.item_count + {joining} < w.max_count
       OR (w.item_count + {joining} = w.max_count AND w.mode <> 'leading'))
  AND (w.mode <> 'sliding' OR (excluded.mode = 'sliding' AND NOT excluded.closed))
RETURNING w.recipient_id, w.type, w.digest_key, w.id, (w.xmax = 0) AS inserted
""".format(
    joining="(excluded.item_count + (excluded.mode = 'leading')::int)",
    # A sliding window moves to the new items' window end, never past its latest.
    due="(CASE WHEN w.mode = 'sliding' THEN least(excluded.due_at, w.latest_due_at)"
        " ELSE w.due_at END)",
)


def upsert_windows(
    cursor: Cursor[Any], groups: dict[GroupKey, list[Waiting]], fresh: dict[GroupKey, Window],
    now: datetime,
) -> list[tuple[GroupKey, uuid.UUID, bool]]:
    """Add each group's items to its open window, or open one, in one statement.

    Returns (group, window id, opened here) for each group settled; a group left out
    has an open window it cannot simply add to (past due, overflowing, a leading one
    filling, a sliding one meeting a digest slot): its row is locked all the same
    (``ON CONFLICT DO UPDATE`` locks the rows its ``WHERE`` refuses). A group opened
    here whose items do not settle in one new window (:func:`_settles`) is written open,
    holding the group's place in the unique index until :func:`assign_rest` fixes it.

    The partial unique index on the open window of a group is what makes two batches
    safe: the second's insert meets the first's row, waits for its commit, then adds to
    the window the first left open (or opens the next if the first closed it).
    """
    rows = []
    stamps: dict[datetime, str] = {}  # most groups share their times: format each once
    for key, items in groups.items():
        window = fresh[key]
        count = _fresh_count(window, len(items))
        closed = _settles(window, len(items)) and 0 < window.max_count <= count
        due = min(window.due_at, now) if closed else window.due_at
        rows.append((
            str(window.id), *key, window.mode,
            stamps.get(due) or stamps.setdefault(due, due.isoformat()),
            stamps.get(window.latest_due_at)
            or stamps.setdefault(window.latest_due_at, window.latest_due_at.isoformat()),
            count, window.max_count, closed,
        ))
    # One JSON text of row arrays: psycopg would dump ten lists element by element.
    cursor.execute(_UPSERT_WINDOWS, {"groups": json.dumps(rows), "now": now})
    return [((r, t, k), window_id, inserted) for r, t, k, window_id, inserted in cursor]


def assign_rest(
    cursor: Cursor[Any], waiting: Sequence[Waiting], reserved: dict[GroupKey, Window],
    now: datetime,
) -> dict[uuid.UUID, uuid.UUID | None]:
    """Place items one at a time, for the groups the upsert left: their open windows
    (or the fresh ones in ``reserved``, already inserted) are locked by this transaction.

    A window past its due time is closed here (still due: the flush takes it) and the
    group's next window opened, as for a window that reaches its maximum.
    """
    open_windows = load_open_windows(
        cursor, sorted({item.key for item in waiting} - reserved.keys()), now
    )
    touched = {w.id: w for w in open_windows.values() if w.closed}  # past due: close
    open_windows = {key: w for key, w in open_windows.items() if not w.closed}
    kept = {w.id for w in reserved.values()} | set(touched) | {
        w.id for w in open_windows.values()}
    placed: dict[uuid.UUID, uuid.UUID | None] = {}
    for item in waiting:
        key = item.key
        window = open_windows.get(key)
        if window is None:
            window = reserved.pop(key, None) or open_window(item, now)
            open_windows[key] = touched[window.id] = window
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
    # Close before opening: the unique index allows one open window per group.
    update_windows(cursor, [w for w in touched.values() if w.id in kept])
    insert_windows(cursor, [w for w in touched.values() if w.id not in kept])
    return placed


def load_open_windows(
    cursor: Cursor[Any], keys: Sequence[GroupKey], now: datetime
) -> dict[GroupKey, Window]:
    """The groups' open windows, locked; one past its due time comes back ``closed``
    (and due), to be written so: it is over even if no flush has taken it yet."""
    if not keys:
        return {}
    cursor.execute(
        """
        SELECT w.id, w.recipient_id, w.type, w.digest_key, w.mode, w.opened_at, w.due_at,
               w.latest_due_at, w.max_count, w.item_count, w.due_at <= %s
        FROM aggregation_windows w
        JOIN json_to_recordset(%s::json) AS g(r text, t text, k text)
          ON w.recipient_id = g.r AND w.type = g.t AND w.digest_key = g.k
        WHERE NOT w.closed
        ORDER BY w.id
        FOR UPDATE OF w
        """,
        (now, json.dumps([{"r": r, "t": t, "k": k} for r, t, k in keys])),
        prepare=False,  # planned for the table as it is now, never a stale generic plan
    )
    return {
        (row[1], row[2], row[3]): Window(row[0], (row[1], row[2], row[3]), *row[4:])
        for row in cursor.fetchall()
    }


def open_window(item: Waiting, now: datetime) -> Window:
    """A new window: the rule's, or the recipient's hourly/daily/weekly digest slot."""
    digest_at = (None if item.preferences.digest_mode == "immediate"  # most: skip the zone
                 else next_digest_at(item.preferences, item.timezone, now))
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
