"""Aggregation: decide what happens to each stored notification, keep the windows, and
flush due windows into digests.

At ingest every notification is routed once, in the batch's transaction:

* **suppressed** — the recipient opted out of its type on every channel, or it is below
  the recipient's minimum priority; stored with the reason, never delivered;
* **dispatched** — delivered without waiting: critical ones, types whose rule does not
  aggregate, a notification with a ``send_at``, the first item of a ``leading`` group;
* **pending** — it joins the open window of its group (recipient, type, digest key),
  opening one if there is none.

Windows live in ``aggregation_windows`` with their due time, so beat's flush finds due
groups with one indexed query and claims them with ``FOR UPDATE SKIP LOCKED``: two
flushes running at once take different windows, never the same one twice. Ingest
serialises on a transaction-scoped advisory lock per group, so two batches never open
two windows for one group.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from notifier.ids import uuid7
from notifier.pipeline.delivery import DeliveryTask, queue_deliveries
from notifier.pipeline.preferences import (
    Preferences,
    next_digest_at,
    parse_preferences,
    quiet_until,
)
from notifier.pipeline.rules import Rule, Rules
from notifier.pipeline.templates import DigestItem, render_digest
from notifier.settings import PRIORITIES, Settings

GroupKey = tuple[str, str, str]  # recipient, type, digest key


@dataclass(frozen=True)
class RecipientState:
    preferences: Preferences
    timezone: str
    name: str | None = None


@dataclass(frozen=True)
class Routed:
    """The decision for one notification at ingest."""

    status: str  # pending | dispatched | suppressed
    reason: str | None = None
    window_id: uuid.UUID | None = None
    #: Channels to deliver on now (dispatched only).
    channels: tuple[str, ...] = ()


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
class NewDelivery:
    recipient_id: str
    channel: str
    priority: str
    notification_id: uuid.UUID | None = None
    digest_id: uuid.UUID | None = None
    #: Held until then (quiet hours, ``send_at``); None: due now.
    hold_until: datetime | None = None


# --- Recipients and channels --------------------------------------------------------


def load_recipient_states(cursor: Any, recipient_ids: Iterable[str]) -> dict[str, RecipientState]:
    cursor.execute(
        "SELECT id, timezone, preferences, name FROM recipients WHERE id = ANY(%s)",
        (sorted(set(recipient_ids)),),
    )
    return {
        row[0]: RecipientState(_preferences(row[2]), row[1] or "UTC", row[3])
        for row in cursor.fetchall()
    }


def _preferences(raw: dict[str, Any] | None) -> Preferences:
    """Stored preferences; ones that no longer validate (an old version's) are ignored
    rather than stopping every notification of the recipient."""
    if not raw:  # most recipients: skip validating the defaults once per notification
        return _DEFAULT_PREFERENCES
    try:
        return parse_preferences(raw)
    except ValueError:
        return Preferences()


#: Shared by every recipient without preferences of their own; never mutated.
_DEFAULT_PREFERENCES = Preferences()
_NO_PREFERENCES = RecipientState(_DEFAULT_PREFERENCES, "UTC")


def channels_for(
    asked: Sequence[str] | None, state: RecipientState, type_: str, settings: Settings
) -> tuple[list[str], list[str]]:
    """(channels to use, channels opted out of): the notification's own channels, else
    the recipient's, else the default ones."""
    wanted = list(asked or state.preferences.channels or settings.default_channels)
    kept = [c for c in wanted if not state.preferences.opted_out(type_, c)]
    return kept, [c for c in wanted if c not in kept]


def hold_until(
    priority: str, state: RecipientState, now: datetime, send_at: datetime | None = None
) -> datetime | None:
    """When a delivery may leave if not now: after ``send_at``, and after the
    recipient's quiet hours (critical passes them)."""
    start = max(now, send_at) if send_at else now
    if priority != "critical":
        quiet_end = quiet_until(state.preferences, state.timezone, start)
        if quiet_end:
            return quiet_end
    return start if start > now else None


# --- Routing at ingest --------------------------------------------------------------


def route_notifications(
    cursor: Any, candidates: Sequence[Any], rules: Rules, settings: Settings, now: datetime
) -> dict[uuid.UUID, Routed]:
    """Decide, for each candidate (``.id``, ``.notification``), what happens to it."""
    states = load_recipient_states(cursor, (c.notification.recipient_id for c in candidates))
    stored = already_stored(cursor, [c.id for c in candidates])
    routed: dict[uuid.UUID, Routed] = {}
    waiting: list[tuple[Any, Rule, GroupKey, RecipientState]] = []
    for candidate in candidates:
        if candidate.id in stored:
            # A redelivered message: the insert skips it, and it must not be counted in
            # a window (or open one) a second time.
            routed[candidate.id] = Routed("pending")
            continue
        n = candidate.notification
        state = states.get(n.recipient_id, _NO_PREFERENCES)
        rule = rules.for_type(n.type)
        channels, opted_out = channels_for(n.channels, state, n.type, settings)
        reason = state.preferences.suppression_reason(n.type, n.priority, channels + opted_out)
        if reason:
            routed[candidate.id] = Routed("suppressed", reason)
        elif n.priority == "critical" or not rule.aggregate or n.send_at is not None:
            routed[candidate.id] = Routed("dispatched", channels=tuple(channels))
        else:
            waiting.append((candidate, rule, group_key(n, rule), state))
    routed.update(assign_windows(cursor, waiting, settings, now))
    return routed


def already_stored(cursor: Any, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    cursor.execute("SELECT id FROM notifications WHERE id = ANY(%s)", (list(ids),))
    return {row[0] for row in cursor.fetchall()}


def group_key(notification: Any, rule: Rule) -> GroupKey:
    value = notification.data.get(rule.digest_key) if rule.digest_key else None
    key = "" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return (notification.recipient_id, notification.type, key[:255])


def assign_windows(
    cursor: Any, waiting: list[tuple[Any, Rule, GroupKey, RecipientState]],
    settings: Settings, now: datetime,
) -> dict[uuid.UUID, Routed]:
    """Put each waiting notification in its group's open window (opening windows as
    needed) and write the windows."""
    if not waiting:
        return {}
    keys = sorted({key for _, _, key, _ in waiting})
    lock_groups(cursor, keys)
    open_windows = load_open_windows(cursor, keys, now)
    touched: dict[uuid.UUID, Window] = {}
    opened: set[uuid.UUID] = set()
    routed: dict[uuid.UUID, Routed] = {}
    for candidate, rule, key, state in waiting:
        window = open_windows.get(key)
        if window is None:
            window = open_window(key, rule, state, now)
            open_windows[key] = touched[window.id] = window
            opened.add(window.id)
            if window.mode == "leading":  # the first goes at once, the rest wait
                channels, _ = channels_for(candidate.notification.channels, state, key[1], settings)
                routed[candidate.id] = Routed("dispatched", channels=tuple(channels))
                continue
        add_to_window(window, rule, now)
        touched[window.id] = window
        routed[candidate.id] = Routed("pending", window_id=window.id)
        if window.closed:
            del open_windows[key]
            follower = continuation(window, now)
            if follower:
                open_windows[key] = touched[follower.id] = follower
                opened.add(follower.id)
    insert_windows(cursor, [w for w in touched.values() if w.id in opened])
    update_windows(cursor, [w for w in touched.values() if w.id not in opened])
    return routed


def lock_groups(cursor: Any, keys: Sequence[GroupKey]) -> None:
    """Serialise batches that touch the same groups (in one global order: no deadlock)."""
    cursor.execute(
        "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(g, 0) AS h"
        " FROM unnest(%s::text[]) AS g ORDER BY h) AS locks",
        (["\x1f".join(key) for key in keys],),
    )


def load_open_windows(
    cursor: Any, keys: Sequence[GroupKey], now: datetime
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


def open_window(key: GroupKey, rule: Rule, state: RecipientState, now: datetime) -> Window:
    """A new window: the rule's, or the recipient's hourly/daily/weekly digest slot."""
    digest_at = next_digest_at(state.preferences, state.timezone, now)
    if digest_at is not None:
        return Window(uuid7(), key, "digest", now, digest_at, digest_at, max_count=0)
    due = now + rule.window
    latest = now + rule.longest_wait if rule.mode == "sliding" else due
    return Window(uuid7(), key, rule.mode, now, due, latest, rule.max_count)


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


def insert_windows(cursor: Any, windows: Sequence[Window]) -> None:
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


def update_windows(cursor: Any, windows: Sequence[Window]) -> None:
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


# --- Deliveries ---------------------------------------------------------------------


def insert_deliveries(cursor: Any, deliveries: Sequence[NewDelivery]) -> list[uuid.UUID]:
    """Write delivery rows; returns the ids due now (pending: the outbox to publish).
    Held ones are ``scheduled`` and the sweeper publishes them when their time comes."""
    if not deliveries:
        return []
    rows = [
        (uuid7(), d.notification_id, d.digest_id, d.recipient_id, d.channel, d.priority,
         "scheduled" if d.hold_until else "pending", d.hold_until)
        for d in deliveries
    ]
    cursor.execute(
        """
        INSERT INTO deliveries (id, notification_id, digest_id, recipient_id, channel,
            priority, status, next_attempt_at, last_error)
        SELECT d.id, d.n, d.g, d.r, d.c, d.p, d.s, coalesce(d.due, now()),
               CASE WHEN d.due IS NOT NULL THEN 'held until ' || d.due::text END
        FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[],
                    %s::text[], %s::timestamptz[]) AS d(id, n, g, r, c, p, s, due)
        ON CONFLICT DO NOTHING
        RETURNING id, status
        """,
        [list(column) for column in zip(*rows, strict=True)],
    )
    return [row[0] for row in cursor.fetchall() if row[1] == "pending"]


def dispatch_now(
    cursor: Any, items: Sequence[tuple[Any, Routed]], now: datetime
) -> list[uuid.UUID]:
    """Delivery rows for notifications that do not wait for a window (``(candidate,
    routed)`` pairs); returns the ids to publish now."""
    if not items:
        return []
    states = load_recipient_states(cursor, (c.notification.recipient_id for c, _ in items))
    deliveries = []
    for candidate, routed in items:
        n = candidate.notification
        held = hold_until(n.priority, states.get(n.recipient_id, _NO_PREFERENCES), now, n.send_at)
        deliveries += [
            NewDelivery(n.recipient_id, channel, n.priority, notification_id=candidate.id,
                        hold_until=held)
            for channel in routed.channels
        ]
    return insert_deliveries(cursor, deliveries)


# --- Flush --------------------------------------------------------------------------


@dataclass
class FlushResult:
    windows: int = 0
    digests: int = 0
    notifications: int = 0
    #: Of those, folded into a digest (the rest went alone, or were suppressed).
    digested: int = 0
    #: Windows whose members were all cancelled (or sent by another way): dropped.
    empty: int = 0
    tasks: list[DeliveryTask] = field(default_factory=list)


@dataclass
class _Member:
    id: uuid.UUID
    window_id: uuid.UUID
    recipient_id: str
    type: str
    priority: str
    channels: list[str] | None
    title: str
    body: str
    data: dict[str, Any]
    created_at: datetime


def flush_due_windows(
    cursor: Any, rules: Rules, settings: Settings, now: datetime, limit: int | None = None
) -> FlushResult:
    """Turn up to ``limit`` due windows into digests and delivery rows, in the caller's
    transaction; the returned tasks are published after it commits."""
    result = FlushResult()
    windows = claim_due_windows(cursor, now, limit or settings.flush_batch_size)
    if not windows:
        return result
    members = load_members(cursor, list(windows))
    states = load_recipient_states(cursor, {w.key[0] for w in windows.values()})
    deliveries: list[NewDelivery] = []
    digests: list[tuple[Any, ...]] = []
    statuses: dict[uuid.UUID, tuple[str, uuid.UUID | None, str | None]] = {}
    for window_id, window in windows.items():
        group = members.get(window_id, [])
        result.windows += 1
        if not group:
            result.empty += 1
            continue
        state = states.get(window.key[0], _NO_PREFERENCES)
        rule = rules.for_type(window.key[1])
        plan = _plan_window(window, group, rule, state, settings, now)
        deliveries += plan.deliveries
        digests += plan.digests
        statuses.update(plan.statuses)
    _write_digests(cursor, digests)
    due_now = insert_deliveries(cursor, deliveries)
    _set_statuses(cursor, statuses)
    cursor.execute("DELETE FROM aggregation_windows WHERE id = ANY(%s)", (list(windows),))
    result.digests = len(digests)
    result.notifications = len(statuses)
    result.digested = sum(1 for status, _, _ in statuses.values() if status == "digested")
    result.tasks = queue_deliveries(cursor, due_now, settings)
    return result


def claim_due_windows(cursor: Any, now: datetime, limit: int) -> dict[uuid.UUID, Window]:
    cursor.execute(
        """
        SELECT id, recipient_id, type, digest_key, mode, opened_at, due_at, latest_due_at,
               max_count, item_count
        FROM aggregation_windows WHERE due_at <= %s
        ORDER BY due_at LIMIT %s
        FOR UPDATE SKIP LOCKED
        """,
        (now, limit),
    )
    return {
        row[0]: Window(row[0], (row[1], row[2], row[3]), row[4], row[5], row[6], row[7],
                       row[8], row[9])
        for row in cursor.fetchall()
    }


def load_members(cursor: Any, window_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[_Member]]:
    """Waiting members, locked: a cancel racing the flush waits, then finds it digested."""
    cursor.execute(
        """
        SELECT id, window_id, recipient_id, type, priority, channels, title, body, data,
               created_at
        FROM notifications WHERE window_id = ANY(%s) AND status = 'pending'
        ORDER BY window_id, created_at, id
        FOR UPDATE
        """,
        (window_ids,),
    )
    members: dict[uuid.UUID, list[_Member]] = defaultdict(list)
    for row in cursor.fetchall():
        members[row[1]].append(_Member(*row))
    return members


@dataclass
class _WindowPlan:
    deliveries: list[NewDelivery] = field(default_factory=list)
    digests: list[tuple[Any, ...]] = field(default_factory=list)
    statuses: dict[uuid.UUID, tuple[str, uuid.UUID | None, str | None]] = field(
        default_factory=dict
    )


def _plan_window(
    window: Window, group: list[_Member], rule: Rule, state: RecipientState,
    settings: Settings, now: datetime,
) -> _WindowPlan:
    """Per channel: one digest of the members sent there (a lone member goes as itself)."""
    plan = _WindowPlan()
    by_channel: dict[str, list[_Member]] = defaultdict(list)
    for member in group:
        channels, _ = channels_for(member.channels, state, member.type, settings)
        if not channels:
            plan.statuses[member.id] = ("suppressed", None, "opted out before its digest")
        for channel in channels:
            by_channel[channel].append(member)
    priority = _highest_priority(group)
    held = hold_until(priority, state, now)
    for channel, members in by_channel.items():
        if len(members) == 1:
            member = members[0]
            plan.deliveries.append(NewDelivery(
                window.key[0], channel, member.priority, notification_id=member.id,
                hold_until=held,
            ))
            plan.statuses.setdefault(member.id, ("dispatched", None, None))
            continue
        digest_id = uuid7()
        plan.digests.append(_digest_row(digest_id, window, channel, members, rule, state))
        plan.deliveries.append(NewDelivery(
            window.key[0], channel, priority, digest_id=digest_id, hold_until=held,
        ))
        for member in members:
            plan.statuses[member.id] = ("digested", digest_id, None)
    return plan


def _highest_priority(members: Sequence[_Member]) -> str:
    return min((m.priority for m in members), key=PRIORITIES.index)


def _digest_row(
    digest_id: uuid.UUID, window: Window, channel: str, members: list[_Member], rule: Rule,
    state: RecipientState,
) -> tuple[Any, ...]:
    items = [
        DigestItem(id=str(m.id), title=m.title, body=m.body, data=m.data,
                   created_at=m.created_at, priority=m.priority)
        for m in members
    ]
    rendered = render_digest(rule, items, recipient_name=state.name,
                             window_start=window.opened_at, window_end=window.due_at)
    item_json = [
        {"id": str(m.id), "title": m.title, "body": m.body, "data": m.data,
         "priority": m.priority, "created_at": m.created_at.isoformat()}
        for m in members
    ]
    return (
        digest_id, window.key[0], window.key[1], channel, window.key[2] or None,
        rendered.title, rendered.body, rendered.html, Jsonb(item_json), len(members),
        [m.id for m in members], window.opened_at, window.due_at,
    )


def _write_digests(cursor: Any, digests: list[tuple[Any, ...]]) -> None:
    if not digests:
        return
    cursor.executemany(
        """
        INSERT INTO digests (id, recipient_id, type, channel, digest_key, title, body, html,
            items, item_count, notification_ids, window_start, window_end)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        digests,
    )


def _set_statuses(
    cursor: Any, statuses: dict[uuid.UUID, tuple[str, uuid.UUID | None, str | None]]
) -> None:
    if not statuses:
        return
    ids, values = list(statuses), list(statuses.values())
    cursor.execute(
        """
        UPDATE notifications n SET status = s.status, digest_id = s.digest_id,
            status_reason = s.reason, updated_at = clock_timestamp()
        FROM unnest(%s::uuid[], %s::text[], %s::uuid[], %s::text[])
            AS s(id, status, digest_id, reason)
        WHERE n.id = s.id
        """,
        (ids, [v[0] for v in values], [v[1] for v in values], [v[2] for v in values]),
    )

