"""The flush: due aggregation windows become digests and delivery rows.

The flush (the workers' flush loops, or beat's tick) claims due windows with ``FOR
UPDATE SKIP LOCKED``: two flushes running at once take different windows, never the
same one twice. Per channel, the members of a window become one digest (a lone member
goes as itself), and the recipient's preferences are read again, so an opt-out made
while waiting still counts.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from notifier.ids import uuid7
from notifier.pipeline.outbox import (
    BatchSize,
    DeliveryTask,
    NewDelivery,
    insert_deliveries,
    queue_deliveries,
)
from notifier.pipeline.routing import (
    NO_PREFERENCES,
    RecipientState,
    channels_for,
    hold_until,
    load_recipient_states,
)
from notifier.pipeline.rules import Rule, Rules
from notifier.pipeline.templates import DigestItem, render_digest
from notifier.pipeline.windows import Window
from notifier.settings import PRIORITIES, Settings

if TYPE_CHECKING:
    from psycopg import Cursor


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
    #: Seconds until the next window is due, by Postgres's clock, after this chunk (None:
    #: not asked, or none waits); see ``seconds_until_next_due``.
    next_due_in: float | None = None


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
    #: It names a ``callback_url``: the delivery that carries it, alone or in a digest,
    #: reports its statuses to it.
    callback: bool = False


def flush_due_windows(
    cursor: Cursor[Any], rules: Rules, settings: Settings, now: datetime | None = None,
    limit: int | None = None, *, batch_size: BatchSize | None = None,
) -> FlushResult:
    """Turn up to ``limit`` due windows into digests and delivery rows, in the caller's
    transaction; the returned tasks (of ``batch_size``, see ``outbox.BatchSize``) are
    published after it commits.

    Due means due by Postgres's clock (``now()``), the clock that opened the windows
    (``ingest_batch``), whatever the flushing host's clock says; a test passes ``now``."""
    result = FlushResult()
    windows, now = claim_due_windows(cursor, now, limit or settings.flush_batch_size)
    if not windows or now is None:
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
        state = states.get(window.key[0], NO_PREFERENCES)
        rule = rules.for_type(window.key[1])
        plan = _plan_window(window, group, rule, state, settings, now)
        deliveries += plan.deliveries
        digests += plan.digests
        statuses.update(plan.statuses)
    _write_digests(cursor, digests)
    due_now = insert_deliveries(cursor, deliveries)
    _set_statuses(cursor, statuses)
    cursor.execute("DELETE FROM aggregation_windows WHERE id = ANY(%b)", (list(windows),))
    result.digests = len(digests)
    result.notifications = len(statuses)
    result.digested = sum(1 for status, _, _ in statuses.values() if status == "digested")
    result.tasks = queue_deliveries(cursor, due_now, settings, batch_size=batch_size)
    return result


def seconds_until_next_due(cursor: Cursor[Any]) -> float | None:
    """Seconds until the next window is due by Postgres's clock (0 or less: one is due
    now; None: no window waits), read from the ``due_at`` index alone; windows already
    due and held by another flush count too. Computed by the server, so a host whose
    clock is fast or slow neither flushes early nor sleeps long."""
    cursor.execute(
        "SELECT extract(epoch FROM min(due_at) - statement_timestamp())::float8"
        " FROM aggregation_windows")
    row = cursor.fetchone()
    return None if row is None or row[0] is None else float(row[0])


def claim_due_windows(
    cursor: Cursor[Any], now: datetime | None, limit: int
) -> tuple[dict[uuid.UUID, Window], datetime | None]:
    """Lock up to ``limit`` windows due by ``now`` (None: Postgres's ``now()``); returns
    them and the time they were judged by."""
    cursor.execute(
        """
        SELECT id, recipient_id, type, digest_key, mode, opened_at, due_at, latest_due_at,
               max_count, item_count, c.now
        FROM aggregation_windows, (SELECT coalesce(%s, now()) AS now) c
        WHERE due_at <= c.now
        ORDER BY due_at LIMIT %s
        FOR UPDATE OF aggregation_windows SKIP LOCKED
        """,
        (now, limit),
    )
    rows = cursor.fetchall()
    windows = {
        row[0]: Window(row[0], (row[1], row[2], row[3]), row[4], row[5], row[6], row[7],
                       row[8], row[9])
        for row in rows
    }
    return windows, rows[0][10] if rows else now


def load_members(
    cursor: Cursor[Any], window_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[_Member]]:
    """Waiting members, locked: a cancel racing the flush waits, then finds it digested."""
    cursor.execute(
        """
        SELECT id, window_id, recipient_id, type, priority, channels, title, body, data,
               created_at, callback_url IS NOT NULL
        FROM notifications WHERE window_id = ANY(%b) AND status = 'pending'
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
                hold_until=held, callback=member.callback,
            ))
            plan.statuses.setdefault(member.id, ("dispatched", None, None))
            continue
        digest_id = uuid7()
        plan.digests.append(_digest_row(digest_id, window, channel, members, rule, state))
        plan.deliveries.append(NewDelivery(
            window.key[0], channel, priority, digest_id=digest_id, hold_until=held,
            callback=any(member.callback for member in members),
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


#: The digests' columns, in the order of ``_digest_row``, and their types for binary COPY.
_DIGEST_COLUMNS = (
    ("id", "uuid"), ("recipient_id", "text"), ("type", "text"), ("channel", "text"),
    ("digest_key", "text"), ("title", "text"), ("body", "text"), ("html", "text"),
    ("items", "jsonb"), ("item_count", "int4"), ("notification_ids", "uuid[]"),
    ("window_start", "timestamptz"), ("window_end", "timestamptz"),
)


def _write_digests(cursor: Cursor[Any], digests: list[tuple[Any, ...]]) -> None:
    """Binary COPY: a chunk's digests (every member's content) in one stream, without
    a statement or a text rendering of each value per digest."""
    if not digests:
        return
    columns = ", ".join(name for name, _ in _DIGEST_COLUMNS)
    with cursor.copy(f"COPY digests ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([kind for _, kind in _DIGEST_COLUMNS])
        for row in digests:
            copy.write_row(row)


def _set_statuses(
    cursor: Cursor[Any], statuses: dict[uuid.UUID, tuple[str, uuid.UUID | None, str | None]]
) -> None:
    if not statuses:
        return
    ids, values = list(statuses), list(statuses.values())
    cursor.execute(
        """
        UPDATE notifications n SET status = s.status, digest_id = s.digest_id,
            status_reason = s.reason, updated_at = clock_timestamp()
        FROM unnest(%b::uuid[], %b::text[], %b::uuid[], %b::text[])
            AS s(id, status, digest_id, reason)
        WHERE n.id = s.id
        """,  # %b: binary parameters, a third of the text rendering's cost per chunk
        (ids, [v[0] for v in values], [v[1] for v in values], [v[2] for v in values]),
    )
