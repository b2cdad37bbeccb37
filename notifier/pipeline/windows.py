"""Aggregation windows: the open window of each group, opened, filled and closed.

Windows live in ``aggregation_windows`` with their due time, so the flush finds due
groups with one indexed query (``notifier.pipeline.flush``). A partial unique index
allows one open (not ``closed``) window per group, so two batches that open a group's
window at once meet on it: the second waits for the first, then adds to its window.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class WaitingGroup:
    """The notifications of one group that wait for a digest, in batch order. They share
    the group's rule and recipient, so what choosing their window needs is kept once."""

    key: GroupKey
    rule: Rule
    #: The recipient's: a digest slot of theirs (hourly, daily...) replaces the rule's window.
    preferences: Preferences
    timezone: str
    #: The caller's handles of the members (ingest: their positions in the batch).
    members: list[int] = field(default_factory=list)


def group_key(notification: Notification, rule: Rule) -> GroupKey:
    value = notification["data"].get(rule.digest_key) if rule.digest_key else None
    key = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return (notification["recipient_id"], notification["type"], key[:255])


Placed = list[uuid.UUID | None]


def assign_windows(
    cursor: Cursor[Any], groups: dict[GroupKey, WaitingGroup], now: datetime,
    wake: datetime | None = None,
) -> dict[GroupKey, Placed]:
    """Put each group's waiting notifications in its open window (opening windows as
    needed) and write the windows. Returns each group's window id per member, None for
    the first of a new ``leading`` window: that one goes at once, the rest wait.

    One statement upserts the open window of every group of the batch
    (:func:`upsert_windows`); the few groups it cannot settle (a window past its due
    time, one that overflows its maximum, a leading window that fills) are then worked
    out one item at a time (:func:`assign_rest`) on rows the upsert has already locked.

    ``wake``: a window written due by then (it opened due that soon, or closed early
    when its group filled) wakes the flush loops, which may be sleeping until then
    (``worker.flush_loop``); None wakes none.
    """
    if not groups:
        return {}
    placed: dict[GroupKey, Placed] = {}
    left: dict[GroupKey, WaitingGroup] = dict(groups)
    reserved: dict[GroupKey, Window] = {}
    for key, fresh, window_id, inserted in upsert_windows(cursor, groups, now, wake):
        group = left.pop(key)
        count = len(group.members)
        if inserted and not _settles(fresh.mode, fresh.max_count, count):
            # Holds the group's slot; assign_rest fills it.
            reserved[key] = Window(window_id, key, fresh.mode, now, fresh.due_at,
                                   fresh.latest_due_at, fresh.max_count)
            left[key] = group
        elif inserted and fresh.mode == "leading":
            placed[key] = [None, *[window_id] * (count - 1)]
        else:
            placed[key] = [window_id] * count
    if left:
        rest = assign_rest(cursor, [groups[key] for key in groups if key in left],
                           reserved, now)
        placed.update(rest)
        if wake is not None:
            _wake_if_due(cursor, {i for ids in rest.values() for i in ids if i}, wake)
    return placed


def _wake_if_due(cursor: Cursor[Any], window_ids: set[uuid.UUID], wake: datetime) -> None:
    """Wake the flush loops if one of the windows is due by ``wake`` (the few windows
    :func:`assign_rest` wrote; the upsert's wake covers the rest)."""
    if window_ids:
        cursor.execute(
            f"SELECT pg_notify('{FLUSH_CHANNEL}', '') FROM aggregation_windows"
            " WHERE id = ANY(%b) AND due_at <= %b LIMIT 1",
            (list(window_ids), wake),
        )


def _fresh_count(mode: str, items: int) -> int:
    """Items a new window of ``items`` holds: a leading window's first one goes at once."""
    return items - 1 if mode == "leading" else items


def _settles(mode: str, max_count: int, items: int) -> bool:
    """Whether a new window taking all ``items`` is the whole story: it does not
    overflow its maximum, and a leading one does not fill (that needs a continuation)."""
    count = _fresh_count(mode, items)
    return (not max_count or count < max_count
            or (count == max_count and mode != "leading"))


#: Upsert every group's open window at once (see :func:`upsert_windows`). ``n`` is the
#: count of items joining: as a new window's count, or added to the open one (for a
#: would-be leading window, one more: its first item joins an existing window). The rows
#: come as one array literal per column: Postgres reads those several times faster than
#: JSON (whose every ``->>`` parses the element again), and Python writes them in a join.
#: What a group's new window would be (``v``) is one of a few kinds: sent once each, and
#: named by its number (``new``) in the groups' rows (a time, parsed, costs microseconds).
_UPSERT_WINDOWS = """
INSERT INTO aggregation_windows AS w (id, recipient_id, type, digest_key, mode, opened_at,
    due_at, latest_due_at, item_count, max_count, closed)
SELECT g.id, g.r, g.t, g.k, v.mode, %(now)s, v.due, v.latest, v.n, v.max, v.closed
FROM unnest(%(id)s::uuid[], %(r)s::text[], %(t)s::text[], %(k)s::text[], %(new)s::int[])
    AS g(id, r, t, k, new)
JOIN unnest(%(mode)s::text[], %(due)s::timestamptz[], %(latest)s::timestamptz[], %(n)s::int[],
            %(max)s::int[], %(closed)s::bool[])
    WITH ORDINALITY AS v(mode, due, latest, n, max, closed, new) USING (new)
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
RETURNING w.recipient_id, w.type, w.digest_key, w.id, (w.xmax = 0) AS inserted, w.due_at
""".format(
    joining="(excluded.item_count + (excluded.mode = 'leading')::int)",
    # A sliding window moves to the new items' window end, never past its latest.
    due="(CASE WHEN w.mode = 'sliding' THEN least(excluded.due_at, w.latest_due_at)"
        " ELSE w.due_at END)",
)

#: The channel a flush loop listens on (``notifier.worker.flush_loop``): a batch that
#: makes a window due within a loop's longest sleep wakes the sleeping loops.
FLUSH_CHANNEL = "notifier_flush"

#: The upsert, and in the same statement the flush loops' wake (``NOTIFY``, sent when
#: the transaction commits) if a window it wrote is due by ``wake`` (NULL: never): read
#: from the rows the upsert returns, so the wake costs no second look at the windows.
_UPSERT_AND_WAKE = f"""
WITH upserted AS ({_UPSERT_WINDOWS})
SELECT recipient_id, type, digest_key, id, inserted, (
    SELECT count(*) FROM (
        SELECT pg_notify('{FLUSH_CHANNEL}', '') FROM upserted WHERE due_at <= %(wake)s LIMIT 1
    ) AS woken)
FROM upserted
"""


@dataclass(frozen=True)
class Fresh:
    """What a new window of a group would be, but its id (shared by many groups)."""

    mode: str
    due_at: datetime
    latest_due_at: datetime
    max_count: int  # 0: no maximum (a recipient's hourly/daily/weekly digest)


def upsert_windows(
    cursor: Cursor[Any], groups: dict[GroupKey, WaitingGroup], now: datetime,
    wake: datetime | None = None,
) -> list[tuple[GroupKey, Fresh, uuid.UUID, bool]]:
    """Add each group's items to its open window, or open one, in one statement.

    Returns (group, its new window's shape, window id, opened here) for each group
    settled; a group left out has an open window it cannot simply add to (past due,
    overflowing, a leading one filling, a sliding one meeting a digest slot): its row
    is locked all the same (``ON CONFLICT DO UPDATE`` locks the rows its ``WHERE``
    refuses). A group opened here whose items do not settle in one new window
    (:func:`_settles`) is written open, holding the group's place in the unique index
    until :func:`assign_rest` fixes it. A window written due by ``wake`` wakes the
    flush loops (:data:`FLUSH_CHANNEL`).

    The partial unique index on the open window of a group is what makes two batches
    safe: the second's insert meets the first's row, waits for its commit, then adds to
    the window the first left open (or opens the next if the first closed it).
    """
    shapes: dict[tuple[Any, ...], Fresh] = {}  # most groups share one: worked out once
    kinds: dict[tuple[int, int], str] = {}  # (shape, items) -> its number in the new windows
    new_windows: list[tuple[str, str, str, str, str, str]] = []
    fresh: list[Fresh] = []
    numbers = []
    for group in groups.values():
        shape = _fresh_shape(group, now, shapes)
        fresh.append(shape)
        items = len(group.members)
        number = kinds.get((id(shape), items))
        if number is None:
            new_windows.append(_fresh_columns(shape, items, now))
            number = kinds[(id(shape), items)] = str(len(new_windows))
        numbers.append(number)
    modes, dues, latests, counts, maxima, closed = zip(*new_windows, strict=True)
    keys = list(groups)
    cursor.execute(_UPSERT_AND_WAKE, {
        "id": _array(uuid7_texts(len(keys))),
        "r": text_array([key[0] for key in keys]),
        "t": text_array([key[1] for key in keys]),
        "k": text_array([key[2] for key in keys]),
        "new": _array(numbers),
        "mode": _array(modes), "due": _array(dues), "latest": _array(latests),
        "n": _array(counts), "max": _array(maxima), "closed": _array(closed), "now": now,
        "wake": wake,
    })
    shape_of = dict(zip(keys, fresh, strict=True))
    return [((r, t, k), shape_of[(r, t, k)], window_id, inserted)
            for r, t, k, window_id, inserted, _ in cursor.fetchall()]


def _fresh_columns(
    shape: Fresh, items: int, now: datetime,
) -> tuple[str, str, str, str, str, str]:
    """A new window's mode, due time, latest due time, count, maximum and closed, as
    array elements, for ``items`` items (closed and due now if they fill it)."""
    count = _fresh_count(shape.mode, items)
    full = 0 < shape.max_count <= count and _settles(shape.mode, shape.max_count, items)
    due = min(shape.due_at, now) if full else shape.due_at
    return (shape.mode, _timestamp(due), _timestamp(shape.latest_due_at), str(count),
            str(shape.max_count), "t" if full else "f")


def _fresh_shape(group: WaitingGroup, now: datetime, shapes: dict[tuple[Any, ...], Fresh]) -> Fresh:
    """The group's new window but its id, from ``shapes`` if a group with the same rule
    (or digest slot) already worked it out in this batch."""
    immediate = group.preferences.digest_mode == "immediate"
    # Identities: the rules and preferences objects outlive the batch's call.
    cache_key = ((id(group.rule),) if immediate
                 else (id(group.rule), id(group.preferences), group.timezone))
    shape = shapes.get(cache_key)
    if shape is None:
        window = open_window(group, now, window_id=_NO_ID)
        shape = shapes[cache_key] = Fresh(window.mode, window.due_at, window.latest_due_at,
                                          window.max_count)
    return shape


_NO_ID = uuid.UUID(int=0)


def _timestamp(value: datetime) -> str:
    """A time as a quoted array element (ISO 8601 with its offset: what Postgres reads)."""
    return '"' + value.isoformat() + '"'


def _array(elements: Iterable[str]) -> str:
    """A Postgres array literal of elements that need no quoting (or are quoted)."""
    return "{" + ",".join(elements) + "}"


def text_array(values: Sequence[str]) -> str:
    """A Postgres ``text[]`` literal of any strings (no NUL: ingest refuses it)."""
    joined = "".join(values)
    if "\\" in joined or '"' in joined:
        return "{" + ",".join(
            '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"
    return '{"' + '","'.join(values) + '"}' if values else "{}"


def uuid7_texts(count: int) -> list[str]:
    """``count`` version 7 UUIDs (:func:`notifier.ids.uuid7`'s layout: this millisecond,
    then random bits) as text, made in one go: a batch opens hundreds of windows."""
    millis = f"{(time.time_ns() // 1_000_000) & ((1 << 48) - 1):012x}"
    head = f"{millis[:8]}-{millis[8:]}-7"
    noise = os.urandom(10 * count).hex()
    texts = []
    for start in range(0, 20 * count, 20):
        r = noise[start:start + 20]
        variant = "89ab"[int(r[3], 16) & 3]
        texts.append(f"{head}{r[:3]}-{variant}{r[4:7]}-{r[8:20]}")
    return texts


def assign_rest(
    cursor: Cursor[Any], groups: Sequence[WaitingGroup], reserved: dict[GroupKey, Window],
    now: datetime,
) -> dict[GroupKey, Placed]:
    """Place items one at a time, for the groups the upsert left: their open windows
    (or the fresh ones in ``reserved``, already inserted) are locked by this transaction.

    A window past its due time is closed here (still due: the flush takes it) and the
    group's next window opened, as for a window that reaches its maximum.
    """
    open_windows = load_open_windows(
        cursor, sorted({group.key for group in groups} - reserved.keys()), now
    )
    touched = {w.id: w for w in open_windows.values() if w.closed}  # past due: close
    open_windows = {key: w for key, w in open_windows.items() if not w.closed}
    kept = {w.id for w in reserved.values()} | set(touched) | {
        w.id for w in open_windows.values()}
    placed: dict[GroupKey, Placed] = {}
    for group in groups:
        key = group.key
        ids = placed[key] = []
        for _ in group.members:
            window = open_windows.get(key)
            if window is None:
                window = reserved.pop(key, None) or open_window(group, now)
                open_windows[key] = touched[window.id] = window
                if window.mode == "leading":  # the first goes at once, the rest wait
                    ids.append(None)
                    continue
            add_to_window(window, group.rule, now)
            touched[window.id] = window
            ids.append(window.id)
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


def open_window(group: WaitingGroup, now: datetime, window_id: uuid.UUID | None = None) -> Window:
    """A new window: the rule's, or the recipient's hourly/daily/weekly digest slot."""
    window_id = window_id or uuid7()
    digest_at = (None if group.preferences.digest_mode == "immediate"  # most: skip the zone
                 else next_digest_at(group.preferences, group.timezone, now))
    if digest_at is not None:
        return Window(window_id, group.key, "digest", now, digest_at, digest_at, max_count=0)
    rule = group.rule
    due = now + rule.window
    latest = now + rule.longest_wait if rule.mode == "sliding" else due
    return Window(window_id, group.key, rule.mode, now, due, latest, rule.max_count)


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
