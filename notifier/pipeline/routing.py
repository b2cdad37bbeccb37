"""Routing: decide, once per notification at ingest, what happens to it.

* **suppressed** — the recipient opted out of its type on every channel, or it is below
  the recipient's minimum priority; stored with the reason, never delivered;
* **dispatched** — delivered without waiting: critical ones, types whose rule does not
  aggregate, a notification with a ``send_at``, the first item of a ``leading`` group;
* **pending** — it joins the open window of its group (recipient, type, digest key),
  opening one if there is none (see ``notifier.pipeline.windows``).

Who gets what on which channel, and whether now or after the recipient's quiet hours,
is decided here too, for ingest and for the flush alike.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from notifier.pipeline.outbox import NewDelivery, insert_deliveries
from notifier.pipeline.preferences import Preferences, parse_preferences, quiet_until
from notifier.pipeline.rules import Rule, Rules
from notifier.pipeline.windows import GroupKey, WaitingGroup, assign_windows, group_key
from notifier.settings import Settings

if TYPE_CHECKING:
    from psycopg import Cursor


@dataclass(frozen=True)
class RecipientState:
    preferences: Preferences
    timezone: str
    name: str | None = None


class Routed(NamedTuple):
    """The decision for one notification at ingest (a tuple: a batch makes hundreds)."""

    status: str  # pending | dispatched | suppressed
    reason: str | None = None
    window_id: uuid.UUID | None = None
    #: Channels to deliver on now (dispatched only).
    channels: tuple[str, ...] = ()


# --- Recipients and channels --------------------------------------------------------


def load_recipient_states(
    cursor: Cursor[Any], recipient_ids: Iterable[str]
) -> dict[str, RecipientState]:
    cursor.execute(
        "SELECT id, timezone, preferences, name FROM recipients WHERE id = ANY(%s)",
        (sorted(set(recipient_ids)),),
    )
    return {
        row[0]: RecipientState(_preferences(row[2]), row[1] or "UTC", row[3])
        for row in cursor.fetchall()
    }


class RecipientStates:
    """Recipients' routing state kept by one process across batches (ingest's cache).

    The statement that reads the states it lacks also reads the preferences generation,
    which triggers bump in the transaction of every change to a recipient's preferences,
    time zone or name (migration 0009). A state is used only while the generation read
    with it is still the one Postgres shows, so a change committed before a batch's
    statement ran is always seen: never stale after ``set_preferences`` returns.
    Recipients missing from the table are never kept (ingest creates them first).
    """

    def __init__(self, limit: int = 100_000) -> None:
        #: Past this many recipients the cache starts over (a bound on its memory).
        self.limit = limit
        self._database: tuple[str, ...] | None = None
        self._generation: int | None = None
        self._states: dict[str, RecipientState] = {}

    def get(self, cursor: Cursor[Any], recipient_ids: Iterable[str]) -> dict[str, RecipientState]:
        """The states of the recipients that exist, as of this statement."""
        wanted = set(recipient_ids)
        database = _database_of(cursor)
        if database != self._database:  # a process may talk to more than one database
            self._database, self._generation, self._states = database, None, {}
        missing = wanted.difference(self._states)
        generation, loaded, own = _read_states(cursor, missing)
        if generation != self._generation:
            if len(missing) < len(wanted):  # what we kept may have changed: read it all
                generation, loaded, own = _read_states(cursor, wanted)
            self._generation, self._states = generation, {}
        if len(self._states) + len(loaded) > self.limit:
            self._states = {}
        # Rows this transaction wrote are used, never kept: it may yet roll back.
        self._states.update((key, state) for key, state in loaded.items() if key not in own)
        states = self._states
        found = {key: states[key] for key in wanted if key in states}
        found.update(loaded)
        return found


    def get_cached(self, recipient_id: str) -> RecipientState | None:
        """What the cache holds for the recipient (checked only at the next ``get``)."""
        return self._states.get(recipient_id)


def _database_of(cursor: Cursor[Any]) -> tuple[str, ...]:
    info = cursor.connection.info
    return (info.host, str(info.port), info.dbname)


def _read_states(
    cursor: Cursor[Any], recipient_ids: Iterable[str]
) -> tuple[int, dict[str, RecipientState], set[str]]:
    """(the preferences generation, the recipients' states, the ids of rows this
    transaction wrote), read by one statement: one snapshot. The ids travel as one JSON
    text (psycopg dumps a list in Python); one index probe each (see
    :func:`already_stored`). A row's ``xmin`` of age 0 is this transaction's own write
    (or, before it wrote anything, the latest commit's: then it is merely not kept)."""
    cursor.execute(
        """
        SELECT generation, NULL, NULL, NULL, NULL, NULL FROM preferences_generation
        UNION ALL
        SELECT NULL, r.id, r.timezone, r.preferences, r.name, age(r.xmin) = 0
        FROM json_array_elements_text(%s::json) AS i(id),
            LATERAL (SELECT *, xmin FROM recipients WHERE id = i.id LIMIT 1) AS r
        """,
        (json.dumps(sorted(recipient_ids)),), prepare=False,  # see already_stored
    )
    generation, states, own = 0, {}, set()
    for gen, key, timezone, preferences, name, written_here in cursor:
        if key is None:
            generation = gen
            continue
        states[key] = RecipientState(_preferences(preferences), timezone or "UTC", name)
        if written_here:
            own.add(key)
    return generation, states, own


#: Ingest's cache of this process (a forked pool process starts from its parent's copy,
#: checked against the generation like any other).
recipient_states = RecipientStates()


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
#: The state of a recipient who set nothing (routing and the flush alike).
NO_PREFERENCES = RecipientState(_DEFAULT_PREFERENCES, "UTC")


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
    cursor: Cursor[Any], candidates: Sequence[Any], rules: Rules, settings: Settings,
    now: datetime, *, stored: Collection[uuid.UUID] = (),
    states: dict[str, RecipientState] | None = None,
) -> list[Routed]:
    """Decide, for each candidate (``.id``, ``.notification``), what happens to it: the
    decisions in the candidates' order.

    ``stored``: the candidates' ids already in ``notifications`` (:func:`already_stored`),
    and ``states``: their recipients' (``recipient_states.get``, read if not given).
    """
    if states is None:
        states = recipient_states.get(cursor, (c.notification["recipient_id"] for c in candidates))
    routes = [_REDELIVERED] * len(candidates)
    groups: dict[GroupKey, WaitingGroup] = {}
    # Notifications alike (the same preferences, type, priority, channels asked, with or
    # without send_at) are decided alike: each kind once per batch.
    decided: dict[tuple[Any, ...], tuple[Routed, Rule | None]] = {}
    for position, candidate in enumerate(candidates):
        if stored and candidate.id in stored:
            # A redelivered message: the insert skips it, and it must not be counted in
            # a window (or open one) a second time.
            continue
        n = candidate.notification
        state = states.get(n["recipient_id"], NO_PREFERENCES)
        asked = n["channels"]
        kind = (id(state.preferences), n["type"], n["priority"], n["send_at"] is None,
                tuple(asked) if asked else None)
        decision = decided.get(kind)
        if decision is None:
            decision = decided[kind] = _decide(n, state, rules, settings)
        routed, rule = decision
        routes[position] = routed
        if rule is None:
            continue
        key = ((n["recipient_id"], n["type"], "") if rule.digest_key is None
               else group_key(n, rule))
        group = groups.get(key)
        if group is None:
            group = groups[key] = WaitingGroup(key, rule, state.preferences, state.timezone)
        group.members.append(position)
    last_id: uuid.UUID | None = None
    pending = _REDELIVERED
    # A window due within the longest an idle flush loop sleeps wakes the loops.
    wake = now + timedelta(seconds=settings.flush_interval) if settings.flush_loop else None
    for key, placed in assign_windows(cursor, groups, now, wake).items():
        for position, window_id in zip(groups[key].members, placed, strict=True):
            if window_id is None:  # leads its window: goes now, on its channels
                routes[position] = Routed("dispatched", channels=routes[position].channels)
                continue
            if window_id is not last_id:  # a group's members share one window
                last_id, pending = window_id, Routed("pending", window_id=window_id)
            routes[position] = pending
    return routes


#: The decision for a notification already stored (a redelivered message's).
_REDELIVERED = Routed("pending")


def _decide(
    n: Any, state: RecipientState, rules: Rules, settings: Settings,
) -> tuple[Routed, Rule | None]:
    """One kind of notification's decision, and its rule if it waits for a window (then
    the decision is ``pending`` with the channels a leading item would go on)."""
    rule = rules.for_type(n["type"])
    channels, opted_out = channels_for(n["channels"], state, n["type"], settings)
    reason = state.preferences.suppression_reason(n["type"], n["priority"], channels + opted_out)
    if reason:
        return Routed("suppressed", reason), None
    if n["priority"] == "critical" or not rule.aggregate or n["send_at"] is not None:
        return Routed("dispatched", channels=tuple(channels)), None
    return Routed("pending", channels=tuple(channels)), rule


def already_stored(cursor: Cursor[Any], ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not ids:
        return set()
    # One index probe per id, whatever the statistics say: `id = ANY(...)` is planned as
    # a scan of the whole table while it is small or not yet analysed (the benchmark's
    # table, growing from empty, cost 23 ms a batch at 50,000 rows; this, 0.4 ms). A
    # uuid[] literal: psycopg would dump a list element by element in Python (and
    # 32 hex digits, which Postgres reads as a uuid, cost less than str(uuid)).
    cursor.execute(
        "SELECT n.id FROM unnest(%s::uuid[]) AS i(id),"
        " LATERAL (SELECT id FROM notifications WHERE id = i.id LIMIT 1) AS n",
        ("{" + ",".join([f"{i.int:032x}" for i in ids]) + "}",), prepare=False,
    )
    return {row[0] for row in cursor.fetchall()}



def dispatch_now(
    cursor: Cursor[Any], items: Sequence[tuple[Any, Routed]], now: datetime,
    *, states: dict[str, RecipientState] | None = None,
) -> list[uuid.UUID]:
    """Delivery rows for notifications that do not wait for a window (``(candidate,
    routed)`` pairs); returns the ids to publish now. ``states`` as for routing."""
    if not items:
        return []
    if states is None:
        states = recipient_states.get(cursor, (c.notification["recipient_id"] for c, _ in items))
    deliveries = []
    for candidate, routed in items:
        n = candidate.notification
        recipient = n["recipient_id"]
        held = hold_until(n["priority"], states.get(recipient, NO_PREFERENCES), now, n["send_at"])
        deliveries += [
            NewDelivery(recipient, channel, n["priority"], notification_id=candidate.id,
                        hold_until=held, callback=bool(n.get("callback_url")))
            for channel in routed.channels
        ]
    return insert_deliveries(cursor, deliveries)
